//! Files on this host's datastores: where an [`ImageRef`] is, and which datastore holds a path.
//!
//! Disks name a datastore and a file inside it, never a host path, so the same record is
//! valid on every host that mounts a shared datastore. Resolution refuses anything that could
//! reach outside the datastore (`..`, absolute names, symlinks pointing elsewhere): a disk
//! request must never make QEMU open, or Ferry delete, a file the operator did not put there.

use std::path::{Component, Path, PathBuf};

use ferry_api::instances::ImageRef;

use crate::config::{AgentConfig, DatastoreConfig};
use crate::AgentError;

/// The configured datastore `name`.
pub fn datastore<'a>(
    config: &'a AgentConfig,
    name: &str,
) -> Result<&'a DatastoreConfig, AgentError> {
    config
        .datastores
        .iter()
        .find(|d| d.name == name)
        .ok_or_else(|| {
            let names: Vec<&str> = config.datastores.iter().map(|d| d.name.as_str()).collect();
            AgentError::refused(
                "unknown-datastore",
                format!(
                    "host {} has no datastore '{name}' (it has: {})",
                    config.name,
                    if names.is_empty() {
                        "none".to_string()
                    } else {
                        names.join(", ")
                    }
                ),
                "name a datastore from `ferry datastore list`, or add it to the agent's config",
            )
        })
}

/// The host path of `image`, refusing names that leave the datastore.
pub fn resolve(config: &AgentConfig, image: &ImageRef) -> Result<PathBuf, AgentError> {
    let store = datastore(config, &image.datastore)?;
    let rel = Path::new(&image.file);
    let plain = !image.file.is_empty()
        && !image.file.chars().any(char::is_control)
        && rel.components().all(|c| matches!(c, Component::Normal(_)));
    if !plain {
        return Err(outside(&image.to_string()));
    }
    let path = store.path.join(rel);
    // A file that exists must really be inside: a symlink may point anywhere.
    if let (Ok(real), Ok(root)) = (path.canonicalize(), store.path.canonicalize()) {
        if !real.starts_with(&root) {
            return Err(outside(&image.to_string()));
        }
    }
    Ok(path)
}

/// The datastore file an absolute host path is, following symlinks; the deepest datastore
/// wins when datastores nest.
pub fn locate(config: &AgentConfig, path: &str) -> Result<ImageRef, AgentError> {
    let p = Path::new(path);
    if !p.is_absolute() || path.chars().any(char::is_control) {
        return Err(outside(path));
    }
    let real = p.canonicalize().map_err(|e| {
        AgentError::refused(
            "image-not-found",
            format!("{path} cannot be opened on host {}: {e}", config.name),
            "give the full path of an existing image on that host",
        )
    })?;
    config
        .datastores
        .iter()
        .filter_map(|d| {
            let root = d.path.canonicalize().ok()?;
            let rel = real.strip_prefix(&root).ok()?;
            Some((root.components().count(), d, rel.to_path_buf()))
        })
        .max_by_key(|(depth, _, _)| *depth)
        .filter(|(_, _, rel)| !rel.as_os_str().is_empty())
        .map(|(_, d, rel)| ImageRef {
            datastore: d.name.clone(),
            file: rel.display().to_string(),
        })
        .ok_or_else(|| outside(path))
}

fn outside(what: &str) -> AgentError {
    AgentError::refused(
        "path-outside-datastores",
        format!(
            "{} is not a file inside a datastore of this host",
            what.escape_debug()
        ),
        "put the image into a datastore (`datastores` in the agent's config) and name it \
         by its path there",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(root: &Path) -> AgentConfig {
        let mut c =
            AgentConfig::from_toml_str("name = \"hv1\"\ncredential = \"c\"\n", "test").unwrap();
        c.datastores = vec![
            DatastoreConfig {
                name: "images".into(),
                path: root.join("images"),
                identity: None,
            },
            DatastoreConfig {
                name: "nested".into(),
                path: root.join("images/nested"),
                identity: None,
            },
        ];
        std::fs::create_dir_all(root.join("images/nested")).unwrap();
        c
    }

    #[test]
    fn names_resolve_inside_their_datastore_only() {
        let dir = tempfile::tempdir().unwrap();
        let c = config(dir.path());
        let r = |file: &str| {
            resolve(
                &c,
                &ImageRef {
                    datastore: "images".into(),
                    file: file.into(),
                },
            )
        };
        assert_eq!(
            r("vm/a.qcow2").unwrap(),
            dir.path().join("images/vm/a.qcow2")
        );
        for bad in ["../etc/shadow", "/etc/shadow", "", "a/../../b", "a\nb"] {
            assert_eq!(
                r(bad).unwrap_err().code(),
                "path-outside-datastores",
                "{bad:?}"
            );
        }
        std::os::unix::fs::symlink("/etc/hostname", dir.path().join("images/link")).unwrap();
        assert_eq!(r("link").unwrap_err().code(), "path-outside-datastores");
        let unknown = resolve(
            &c,
            &ImageRef {
                datastore: "nope".into(),
                file: "a".into(),
            },
        );
        assert_eq!(unknown.unwrap_err().code(), "unknown-datastore");
    }

    #[test]
    fn a_path_is_located_in_the_deepest_datastore() {
        let dir = tempfile::tempdir().unwrap();
        let c = config(dir.path());
        let f = dir.path().join("images/nested/x.raw");
        std::fs::write(&f, b"x").unwrap();
        let found = locate(&c, &f.display().to_string()).unwrap();
        assert_eq!(
            (found.datastore.as_str(), found.file.as_str()),
            ("nested", "x.raw")
        );
        let outside_file = dir.path().join("other.raw");
        std::fs::write(&outside_file, b"x").unwrap();
        let err = locate(&c, &outside_file.display().to_string()).unwrap_err();
        assert_eq!(err.code(), "path-outside-datastores");
        assert_eq!(
            locate(&c, "/nonexistent/x").unwrap_err().code(),
            "image-not-found"
        );
        assert_eq!(
            locate(&c, "relative").unwrap_err().code(),
            "path-outside-datastores"
        );
    }
}
