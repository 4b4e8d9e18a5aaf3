#!/bin/sh
# Installs ferry as a server or an agent on this host: the binary, the systemd unit, and an
# example configuration if none exists yet. Configuration (join token) and state (database,
# agent credential) are root's only: /etc/ferry 0700, its files 0600.
#
#   deploy/install.sh server|agent [path/to/ferry]
set -eu
role=${1:?usage: $0 server|agent [path/to/ferry]}
case $role in server | agent) ;; *) echo "usage: $0 server|agent [path/to/ferry]" >&2; exit 1 ;; esac
here=$(cd "$(dirname "$0")" && pwd)
binary=${2:-$here/../target/release/ferry}
umask 077
install -m 0755 "$binary" /usr/local/bin/ferry
install -d -m 0700 /etc/ferry
chmod 0700 /etc/ferry
if [ ! -e "/etc/ferry/$role.toml" ]; then
	install -m 0600 "$here/$role.toml" "/etc/ferry/$role.toml"
	echo "edit /etc/ferry/$role.toml (tokens, addresses), then: systemctl enable --now ferry-$role"
fi
chmod 0600 "/etc/ferry/$role.toml"
install -m 0644 "$here/ferry-$role.service" "/etc/systemd/system/ferry-$role.service"
systemctl daemon-reload
