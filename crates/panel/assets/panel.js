// Ferry panel: confirmations, live pages from the server's event stream, and the migration
// screen's figures and charts. No library; served by the panel itself.
(() => {
  'use strict';

  // --- confirmations for actions that can hurt -------------------------------------------
  const dlg = document.getElementById('confirm');
  document.addEventListener('submit', (ev) => {
    const form = ev.target;
    if (!(form instanceof HTMLFormElement) || !form.dataset.confirm || form.dataset.confirmed) return;
    ev.preventDefault();
    const go = () => { form.dataset.confirmed = '1'; form.submit(); };
    if (!dlg || typeof dlg.showModal !== 'function') {
      if (window.confirm(form.dataset.confirm)) go();
      return;
    }
    document.getElementById('confirm-text').textContent = form.dataset.confirm;
    dlg.returnValue = '';
    dlg.onclose = () => { if (dlg.returnValue === 'ok') go(); };
    dlg.showModal();
  });
  document.querySelectorAll('a[data-back]').forEach((a) => a.addEventListener('click', (ev) => {
    if (history.length > 1) { ev.preventDefault(); history.back(); }
  }));

  // --- the Live Migrate dialog -------------------------------------------------------------
  const pc = document.getElementById('post_copy');
  if (pc) {
    const ack = document.getElementById('post_copy_ack');
    const box = document.getElementById('postcopy-box');
    const ta = document.querySelector('#timeout_action option[value="postcopy"]');
    const sync = () => {
      box.classList.toggle('on', pc.checked);
      ack.required = pc.checked;
      ack.disabled = !pc.checked;
      if (ta) {
        ta.disabled = !pc.checked;
        if (!pc.checked && ta.selected) document.getElementById('timeout_action').value = 'abort';
      }
    };
    pc.addEventListener('change', sync);
    sync();
  }

  // --- formatting, as the server formats ---------------------------------------------------
  const MiB = 1048576;
  const fmtBytes = (b) => {
    if (b >= 1024 * MiB) return (b / (1024 * MiB)).toFixed(1) + ' GiB';
    if (b >= MiB) return (b / MiB).toFixed(1) + ' MiB';
    if (b >= 1024) return (b / 1024).toFixed(1) + ' KiB';
    return Math.round(b) + ' B';
  };
  const fmtRate = (bps) => (bps / MiB).toFixed(1) + ' MiB/s';
  const fmtMs = (ms) => {
    if (ms == null) return '—';
    if (ms < 1000) return ms + ' ms';
    if (ms < 120000) return (ms / 1000).toFixed(1) + ' s';
    return Math.floor(ms / 60000) + ' min ' + Math.floor((ms % 60000) / 1000) + ' s';
  };
  const title = (s) => s.charAt(0).toUpperCase() + s.slice(1).replace(/_/g, ' ');
  const TERMINAL = ['completed', 'failed', 'cancelled'];

  // --- list pages: refresh the live part on cluster events ---------------------------------
  const live = document.querySelector('[data-live-list]');
  if (live && window.EventSource) {
    let timer = null;
    const refresh = async () => {
      timer = null;
      if (dlg && dlg.open) { timer = setTimeout(refresh, 400); return; }
      try {
        const r = await fetch(location.href, { credentials: 'same-origin' });
        if (!r.ok) return;
        const doc = new DOMParser().parseFromString(await r.text(), 'text/html');
        // A confirmation opened while the page was fetched: replacing its form now would
        // lose the confirmed action, so try again later.
        if (dlg && dlg.open) { timer = setTimeout(refresh, 400); return; }
        const fresh = doc.getElementById('live');
        const now = document.getElementById('live');
        if (fresh && now) {
          const open = [...now.querySelectorAll('details[open]')].map((d) => d.dataset.checks);
          now.replaceChildren(...fresh.childNodes);
          open.forEach((h) => { const d = now.querySelector(`details[data-checks="${h}"]`); if (d) d.open = true; });
          now.dataset.refreshed = String(Number(now.dataset.refreshed || 0) + 1);
        }
      } catch (_) { /* the next event tries again */ }
    };
    const es = new EventSource('/events');
    const soon = () => { if (!timer) timer = setTimeout(refresh, 400); };
    ['migration', 'instance', 'host', 'alarm'].forEach((k) => es.addEventListener(k, soon));
    window.addEventListener('pagehide', () => es.close());
  }

  // --- the migration screen -----------------------------------------------------------------
  const screen = document.querySelector('[data-migration]');
  if (!screen) return;
  const id = screen.dataset.migration;
  // Chart points by the sample's elapsed ms: the stored history and the live samples may
  // arrive in either order and overlap, and each moment is drawn once.
  const points = new Map();
  const addPoint = (p) => {
    points.set(p.elapsed_ms, [p.remaining_bytes / MiB, p.throughput_bps / MiB, p.dirty_rate_bps / MiB]);
  };
  const set = (f, v) => screen.querySelectorAll(`[data-f="${f}"]`).forEach((e) => { e.textContent = v; });
  let updates = 0;
  const bump = () => {
    updates += 1;
    screen.dataset.updates = String(updates);
    set('updates', String(updates));
  };

  const SVGNS = 'http://www.w3.org/2000/svg';
  const el = (name, attrs) => {
    const e = document.createElementNS(SVGNS, name);
    Object.entries(attrs).forEach(([k, v]) => e.setAttribute(k, String(v)));
    return e;
  };
  // One line chart: time (s) across, value (MiB or MiB/s) up, its largest value labelled.
  const draw = (svgId, pts, cls) => {
    const svg = document.getElementById(svgId);
    if (!svg) return;
    const W = 300, H = 120, L = 4, T = 14, B = 14;
    svg.replaceChildren();
    svg.setAttribute('data-points', String(pts.length));
    svg.appendChild(el('line', { x1: L, y1: H - B, x2: W, y2: H - B, class: 'axis' }));
    if (pts.length === 0) {
      const t = el('text', { x: W / 2, y: H / 2, 'text-anchor': 'middle', class: 'lbl' });
      t.textContent = 'waiting for samples';
      svg.appendChild(t);
      return;
    }
    const t0 = pts[0][0], t1 = Math.max(pts[pts.length - 1][0], t0 + 1);
    const vmax = Math.max(...pts.map((p) => p[1]), 1e-9);
    const x = (t) => L + (W - L) * (t - t0) / (t1 - t0);
    const y = (v) => T + (H - T - B) * (1 - v / vmax);
    const line = pts.map((p) => x(p[0]).toFixed(1) + ',' + y(p[1]).toFixed(1)).join(' ');
    const area = `${x(pts[0][0]).toFixed(1)},${H - B} ${line} ${x(pts[pts.length - 1][0]).toFixed(1)},${H - B}`;
    svg.appendChild(el('polygon', { points: area, class: 'area ' + cls }));
    svg.appendChild(el('polyline', { points: line, class: 'line ' + cls }));
    const top = el('text', { x: W - 2, y: 11, 'text-anchor': 'end', class: 'lbl' });
    top.textContent = 'max ' + vmax.toFixed(1);
    svg.appendChild(top);
    const span = el('text', { x: W - 2, y: H - 2, 'text-anchor': 'end', class: 'lbl' });
    span.textContent = ((t1 - t0)).toFixed(1) + ' s';
    svg.appendChild(span);
    const now = el('text', { x: L + 2, y: 11, class: 'lbl' });
    now.textContent = 'now ' + pts[pts.length - 1][1].toFixed(1);
    svg.appendChild(now);
  };
  const drawAll = () => {
    const ts = [...points.keys()].sort((a, b) => a - b);
    const col = (i) => ts.map((t) => [t / 1000, points.get(t)[i]]);
    draw('chart-remaining', col(0), 'c1');
    draw('chart-throughput', col(1), 'c2');
    draw('chart-dirty', col(2), 'c3');
  };

  const applyProgress = (p) => {
    if (!p) return;
    const bar = document.getElementById('bar');
    if (bar) bar.value = p.percent;
    set('percent', Math.round(p.percent) + ' %');
    set('phase', p.phase);
    set('transferred', fmtBytes(p.transferred_bytes));
    set('remaining', fmtBytes(p.remaining_bytes));
    const disks = p.disks || [];
    if (disks.length) {
      set('disk_done', fmtBytes(disks.reduce((a, d) => a + d.copied_bytes, 0)));
      set('disk_left', fmtBytes(disks.reduce((a, d) => a + d.remaining_bytes, 0)));
    }
    set('iteration', String(p.iteration));
    set('speed', fmtRate(p.throughput_bps));
    set('dirty', fmtRate(p.dirty_rate_bps));
    set('eta', fmtMs(p.eta_ms));
    set('expected_pause', fmtMs(p.expected_qemu_pause_ms));
    if (p.qemu_pause_ms != null) set('final_pause', fmtMs(p.qemu_pause_ms));
    set('throttle', p.cpu_throttle_percent != null ? p.cpu_throttle_percent + ' %' : '—');
    set('elapsed', fmtMs(p.elapsed_ms));
    if (!points.has(p.elapsed_ms)) {
      addPoint(p);
      drawAll();
    }
  };

  // The job's stored samples, page by page (the server caps a page): a screen opened mid-way
  // or after the end draws the whole course, not only what arrives from now on.
  const loadHistory = async () => {
    let after = 0;
    try {
      for (let page = 0; page < 100; page += 1) {
        const r = await fetch(`/migrations/${id}/samples?after=${after}`, { credentials: 'same-origin' });
        if (!r.ok) break;
        const body = await r.json();
        body.samples.forEach((s) => addPoint(s.progress));
        if (body.next_after == null) break;
        after = body.next_after;
      }
    } catch (_) { /* the live samples still draw */ }
    drawAll();
    screen.dataset.history = String(points.size);
  };

  let ended = TERMINAL.includes(screen.dataset.state);
  // The sections only the server renders (report, actions, plan, log) come back fresh once.
  // Never while a confirmation is open: its form would be replaced under it and the confirmed
  // action lost; the refresh runs when the dialog closes instead. What the user typed into
  // the fresh controls' fields is kept. `data-sections` says which state they show.
  let deferred = false;
  const refreshSections = async () => {
    if (dlg && dlg.open) { deferred = true; return; }
    try {
      const r = await fetch(location.href, { credentials: 'same-origin' });
      if (!r.ok) return;
      const doc = new DOMParser().parseFromString(await r.text(), 'text/html');
      if (dlg && dlg.open) { deferred = true; return; }
      ['controls', 'cancel-requested', 'plan', 'decisions', 'log'].forEach((sid) => {
        const old = document.getElementById(sid);
        const neu = doc.getElementById(sid);
        if (old && neu) {
          old.querySelectorAll('input[id]').forEach((i) => {
            const n = neu.querySelector('#' + i.id);
            if (n && i.value !== '' && i.type !== 'hidden') n.value = i.value;
          });
          old.replaceWith(neu);
        } else if (old) old.remove();
      });
      const rep = doc.getElementById('report');
      const plan = document.getElementById('plan');
      if (rep && !document.getElementById('report') && plan) plan.before(rep);
      const fresh = doc.getElementById('screen');
      if (fresh) screen.dataset.sections = fresh.dataset.state;
    } catch (_) { /* keep what is shown */ }
  };
  if (dlg) dlg.addEventListener('close', () => { if (deferred && dlg.returnValue !== 'ok') { deferred = false; refreshSections(); } });

  const applyMigration = (m) => {
    const badge = screen.querySelector('.status [data-f="state"]');
    if (badge) {
      badge.textContent = title(m.state);
      badge.className = 'badge st-' + m.state;
    }
    const was = screen.dataset.state;
    screen.dataset.state = m.state;
    if (m.progress) applyProgress(m.progress);
    if (m.stats) set('final_pause', fmtMs(m.stats.qemu_pause_ms));
    if (TERMINAL.includes(m.state)) {
      if (!ended) { ended = true; refreshSections(); }
    } else if (was !== m.state || m.cancel_requested) {
      refreshSections();
    }
  };

  const renderLogs = (lines) => {
    const log = document.getElementById('log');
    const dec = document.getElementById('decisions');
    if (!log || !dec) return;
    const li = (l, withTime) => {
      const e = document.createElement('li');
      e.className = 'lv-' + l.level;
      if (withTime) {
        const t = document.createElement('time');
        t.textContent = new Date(l.at).toISOString().slice(11, 23);
        e.appendChild(t);
        e.appendChild(document.createTextNode(' '));
      }
      e.appendChild(document.createTextNode(l.message));
      return e;
    };
    log.replaceChildren(...lines.map((l) => li(l, true)));
    dec.replaceChildren(...lines.filter((l) => l.message.startsWith('controller')).map((l) => li(l, false)));
  };
  const pollLogs = async () => {
    try {
      const r = await fetch(`/migrations/${id}/logs`, { credentials: 'same-origin' });
      if (r.ok) renderLogs(await r.json());
    } catch (_) { /* next time */ }
    if (!ended) setTimeout(pollLogs, 2000);
  };

  try {
    const first = JSON.parse(document.getElementById('migration-json').textContent);
    if (first.progress) applyProgress(first.progress);
  } catch (_) { /* no initial record */ }
  drawAll();
  loadHistory();
  if (ended || !window.EventSource) return;
  setTimeout(pollLogs, 2000);
  const es = new EventSource(`/migrations/${id}/events`);
  es.addEventListener('migration', (e) => {
    bump();
    applyMigration(JSON.parse(e.data).migration);
    if (ended) es.close();
  });
  es.addEventListener('progress', (e) => {
    bump();
    applyProgress(JSON.parse(e.data).progress);
  });
  es.onerror = () => { if (ended) es.close(); };
  window.addEventListener('pagehide', () => es.close());
})();
