// vdd's admin panel: four views (#/room, #/seat/MAC, #/sessions, #/server) drawn from
// small JSON routes polled every 2 s while the page is visible. No framework: the DOM is
// built with textContent only (nothing the server sends is parsed as HTML).
'use strict';

const POLL_MS = 2000;
const SCREEN_MS = 3000;
let state = null; // the last /admin/api/state
let csrf = '';
const screens = new Map(); // "id/width" -> <img>, kept across redraws

function el(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === 'class') e.className = v;
    else if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
    else if (k.startsWith('data-')) e.setAttribute(k, v);
    else e[k] = v;
  }
  for (const k of kids.flat()) {
    if (k === null || k === undefined) continue;
    e.append(k instanceof Node ? k : document.createTextNode(String(k)));
  }
  return e;
}

async function get(path) {
  const r = await fetch(path, { credentials: 'same-origin', cache: 'no-store' });
  if (r.status === 401) { location.href = '/admin/'; throw new Error('logged out'); }
  if (!r.ok) throw new Error(path + ': ' + r.status);
  return r.json();
}

async function post(path, body) {
  const r = await fetch(path, {
    method: 'POST', credentials: 'same-origin',
    headers: { 'Content-Type': 'application/json', 'X-CSRF-Token': csrf },
    body: body ? JSON.stringify(body) : '',
  });
  const text = await r.text();
  const v = text ? JSON.parse(text) : {};
  if (!r.ok) throw new Error(v.error || ('HTTP ' + r.status));
  return v;
}

function ago(ms, now) {
  if (!ms) return '—';
  const s = Math.max(0, Math.round((now - ms) / 1000));
  if (s < 60) return s + ' s ago';
  if (s < 3600) return Math.floor(s / 60) + ' min ago';
  return Math.floor(s / 3600) + ' h ' + Math.floor((s % 3600) / 60) + ' min ago';
}

function age(secs) {
  if (secs < 60) return secs + ' s';
  if (secs < 3600) return Math.floor(secs / 60) + ' min';
  return Math.floor(secs / 3600) + ' h ' + Math.floor((secs % 3600) / 60) + ' min';
}

function mib(bytes) { return bytes === null || bytes === undefined ? '—' : Math.round(bytes / 1048576) + ' MiB'; }
function bytes(n) {
  if (n >= 1 << 30) return (n / (1 << 30)).toFixed(2) + ' GiB';
  if (n >= 1 << 20) return (n / (1 << 20)).toFixed(1) + ' MiB';
  if (n >= 1 << 10) return (n / (1 << 10)).toFixed(1) + ' KiB';
  return n + ' B';
}

function stateSpan(s) { return el('span', { class: 'state state-' + s }, s); }

// A live screen of a session: one <img> per (session, width), reloaded by refreshScreens.
function screen(id, width, cls) {
  const key = id + '/' + width;
  let img = screens.get(key);
  if (!img) {
    img = el('img', { class: 'screen ' + cls, alt: 'screen of session ' + id, 'data-session': id, 'data-width': String(width) });
    img.dataset.base = '/admin/api/screen/' + encodeURIComponent(id) + '.png?w=' + width;
    img.dataset.loading = '1';
    img.onload = img.onerror = () => { img.dataset.loading = ''; };
    img.src = img.dataset.base + '&t=' + Date.now();
    screens.set(key, img);
  }
  return img;
}

// Every few seconds, while the page is visible: the screens on it that are in view.
function refreshScreens() {
  if (document.hidden) return;
  const live = new Set();
  for (const img of document.querySelectorAll('img.screen')) {
    live.add(img.dataset.session + '/' + img.dataset.width);
    const r = img.getBoundingClientRect();
    const inView = r.bottom > 0 && r.top < innerHeight && r.width > 0;
    if (!inView || img.dataset.loading) continue;
    img.dataset.loading = '1';
    img.src = img.dataset.base + '&t=' + Date.now();
  }
  for (const k of [...screens.keys()]) if (!live.has(k)) screens.delete(k);
}

function actions(s) {
  const act = (what, label, cls) => el('button', {
    class: what + (cls ? ' ' + cls : ''), 'data-session': s.id, type: 'button',
    onclick: async (ev) => {
      ev.target.disabled = true;
      try { await post('/admin/api/sessions/' + encodeURIComponent(s.id) + '/' + what); }
      catch (e) { alert(label + ': ' + e.message); }
      poll();
    },
  }, label);
  return [act('reset', 'Reset'), ' ', act('end', 'End', 'danger')];
}

// ---- Room: a row per seat ever seen.
function room(v) {
  const now = v.now_ms;
  const rows = v.seats.map((s) => el('tr', { 'data-mac': s.mac },
    el('td', {}, el('a', { href: '#/seat/' + s.mac, class: 'mono' }, s.mac), el('div', { class: 'muted' }, s.hostname || '')),
    el('td', { class: 'mono ip' }, s.ip || '—'),
    el('td', { class: 'firmware' }, (s.firmware || []).map((f) => f.toUpperCase()).join(' → ') || '—'),
    el('td', { class: 'stage', 'data-stage': s.stage ? s.stage.stage : '' },
      s.stage ? s.stage.label : '—', s.stage && s.stage.detail ? el('div', { class: 'muted' }, s.stage.detail) : null),
    el('td', { class: 'last-seen' }, ago(s.last_seen_ms, now)),
    el('td', { class: 'sessions' }, el('div', { class: 'tiles' }, s.sessions.map((x) => el('div', { class: 'tile', 'data-session': x.id },
      x.state === 'failed' ? null : screen(x.id, 160, 'thumb'),
      el('div', {}, x.guest, ' ', stateSpan(x.state))))))));
  return [
    el('h2', {}, 'Room'),
    el('p', { class: 'muted' }, v.seats.length + ' seats, ' + v.sessions.filter((s) => s.state !== 'failed').length + ' sessions running'),
    el('table', { id: 'room' },
      el('thead', {}, el('tr', {}, ['Seat', 'Address', 'Firmware', 'Boot stage now', 'Last seen', 'Sessions'].map((h) => el('th', {}, h)))),
      el('tbody', {}, rows)),
  ];
}

// ---- Seat: its boots as timelines, its sessions, the actions.
function timeline(boot, client) {
  const stages = boot.stages;
  const end = stages.length ? stages[stages.length - 1].at_ms : boot.started_ms;
  const span = Math.max(1, end - boot.started_ms);
  return el('ol', { class: 'timeline' }, stages.map((st, i) => {
    const prev = i ? stages[i - 1].at_ms : boot.started_ms;
    return el('li', { class: client.has(st.stage) ? 'client' : 'server', 'data-stage': st.stage },
      el('span', { class: 'mono' }, '+' + ((st.at_ms - boot.started_ms) / 1000).toFixed(1) + ' s'),
      el('span', { class: 'mono muted' }, '(+' + ((st.at_ms - prev) / 1000).toFixed(1) + ')'),
      el('span', {}, st.label, st.uptime_ms !== null && st.uptime_ms !== undefined ? el('span', { class: 'muted' }, ' · uptime ' + (st.uptime_ms / 1000).toFixed(1) + ' s') : null),
      el('span', {}, el('span', { class: 'muted' }, st.detail || ''),
        el('div', { class: 'bar', style: 'width:' + Math.max(0.5, 100 * (st.at_ms - prev) / span).toFixed(1) + '%' })));
  }));
}

function seatView(v, s) {
  const seat = s.seat;
  const client = new Set(s.stages.filter((x) => x.client).map((x) => x.stage));
  const mine = v.sessions.filter((x) => x.seat === seat.mac);
  const pick = el('select', { id: 'start-guest' }, v.guests.map((g) => el('option', { value: g.name }, g.label || g.name)));
  const start = el('button', {
    id: 'start', type: 'button', onclick: async () => {
      start.disabled = true;
      try { await post('/admin/api/sessions', { guest: pick.value, seat: seat.mac }); } catch (e) { alert('Start: ' + e.message); }
      start.disabled = false;
      poll();
    },
  }, 'Start');
  const boots = s.boots.map((b, i) => {
    const title = (i === 0 ? 'This boot' : 'Boot before') + ' — ' + new Date(b.started_ms).toLocaleString() +
      (b.firmware.length ? ' (' + b.firmware.map((f) => f.toUpperCase()).join(' → ') + ')' : '');
    return i === 0
      ? el('section', { id: 'boot-current' }, el('h3', {}, title), timeline(b, client))
      : el('details', { class: 'boot-earlier' }, el('summary', {}, title + ', ' + b.stages.length + ' stages'), timeline(b, client));
  });
  return [
    el('h2', { id: 'seat-title' }, 'Seat ', el('span', { class: 'mono' }, seat.mac), seat.hostname ? ' · ' + seat.hostname : ''),
    el('p', {}, 'Address ', el('span', { class: 'mono' }, seat.ip || '—'), ' · last seen ', ago(seat.last_seen_ms, s.now_ms),
      ' · boot stage now: ', el('b', { id: 'seat-stage' }, seat.stage ? seat.stage.label : '—')),
    el('h3', {}, 'Sessions'),
    el('table', { id: 'seat-sessions' },
      el('thead', {}, el('tr', {}, ['Screen', 'Guest', 'State', 'Age', ''].map((h) => el('th', {}, h)))),
      el('tbody', {}, mine.map((x) => el('tr', { 'data-session': x.id },
        el('td', {}, x.state === 'failed' ? '' : screen(x.id, 320, 'thumb')),
        el('td', {}, x.guest_label || x.guest),
        el('td', { class: 'state' }, stateSpan(x.state), x.error ? el('div', { class: 'error' }, x.error) : null),
        el('td', {}, age(v.now - x.started)),
        el('td', {}, x.state === 'failed' ? '' : actions(x)))))),
    el('p', {}, 'Start a guest for this seat: ', pick, ' ', start),
    boots.length ? boots : el('p', { class: 'muted' }, 'No boot of this seat seen yet.'),
    el('h3', {}, 'Recent events of this seat'),
    events(s.events),
  ];
}

// ---- Sessions: every session, a larger live screen, what its VM costs.
function sessionsView(v) {
  const cfgMem = (x) => x.memory_mib ? x.memory_mib + ' MiB' : '—';
  return [
    el('h2', {}, 'Sessions'),
    el('table', { id: 'sessions' },
      el('thead', {}, el('tr', {}, ['Screen', 'Guest', 'Seat', 'State', 'Age', 'Memory (guest / resident)', 'CPU', ''].map((h) => el('th', {}, h)))),
      el('tbody', {}, v.sessions.map((x) => el('tr', { 'data-session': x.id },
        el('td', {}, x.state === 'failed' ? el('span', { class: 'muted' }, 'VM stopped') : screen(x.id, 640, 'large')),
        el('td', {}, x.guest_label || x.guest, el('div', { class: 'muted mono' }, x.id)),
        el('td', {}, el('a', { href: '#/seat/' + x.seat, class: 'mono' }, x.seat), el('div', { class: 'muted' }, x.seat_name || '')),
        el('td', { class: 'state' }, stateSpan(x.state), x.error ? el('div', { class: 'error' }, x.error) : null),
        el('td', {}, age(v.now - x.started)),
        el('td', { class: 'mem' }, cfgMem(x), ' / ', mib(x.rss_bytes)),
        el('td', { class: 'cpu' }, x.cpu_percent === null || x.cpu_percent === undefined ? '—' : x.cpu_percent.toFixed(0) + ' %'),
        el('td', {}, x.state === 'failed' ? '' : actions(x)))))),
    v.sessions.length ? null : el('p', { class: 'muted' }, 'No sessions.'),
  ];
}

// ---- Server: pool and leases, transfers, VMs, the recent events.
let eventSeat = '';
function events(list) {
  return el('table', { id: 'events' },
    el('thead', {}, el('tr', {}, ['Time', 'Level', 'Seat', 'What'].map((h) => el('th', {}, h)))),
    el('tbody', {}, list.slice().reverse().map((e) => el('tr', { class: 'level-' + e.level },
      el('td', { class: 'mono' }, new Date(e.at_ms).toLocaleTimeString()),
      el('td', { class: e.level === 'error' || e.level === 'warn' ? 'error' : '' }, e.level),
      el('td', { class: 'mono' }, e.mac || e.ip || ''),
      el('td', {}, e.message, ' ', el('span', { class: 'muted' }, [e.session ? 'session=' + e.session : '', e.guest ? 'guest=' + e.guest : '', e.fields].join(' ')))))));
}

function card(title, big, sub, used, of) {
  return el('div', { class: 'card' }, title, el('b', {}, big), el('span', { class: 'muted' }, sub),
    of ? el('div', { class: 'meter' }, el('div', { style: 'width:' + Math.min(100, 100 * used / of) + '%' })) : null);
}

function serverView(v, sv) {
  const d = sv.dhcp;
  const vm = sv.vms || {};
  const pick = el('select', { id: 'event-seat', onchange: () => { eventSeat = pick.value; poll(); } },
    el('option', { value: '' }, 'all seats'),
    v.seats.map((s) => el('option', { value: s.mac, selected: s.mac === eventSeat }, s.mac + (s.hostname ? ' ' + s.hostname : ''))));
  return [
    el('h2', {}, 'Server'),
    el('div', { class: 'cards', id: 'figures' },
      card('DHCP pool', d.pool ? (d.active ?? '—') + ' / ' + d.pool.size : d.mode, d.pool ? 'addresses leased (' + d.pool.first + '–' + d.pool.last + ')' : 'no pool', d.active || 0, d.pool ? d.pool.size : 0),
      card('DHCP answers', d.offers + ' / ' + d.acks, 'offers / acks, ' + d.naks + ' naks'),
      card('TFTP', sv.tftp.in_flight + ' in flight', sv.tftp.transfers + ' done, ' + bytes(sv.tftp.bytes)),
      card('HTTP', sv.http.in_flight + ' in flight', sv.http.transfers + ' done, ' + bytes(sv.http.bytes)),
      card('NBD', sv.nbd.connections + ' connections', 'read ' + bytes(sv.nbd.read_bytes) + ', written ' + bytes(sv.nbd.written_bytes)),
      card('VM slots', (vm.vms ?? 0) + ' / ' + (vm.max_vms ?? 0), (vm.starting ?? 0) + ' starting', vm.vms || 0, vm.max_vms || 0),
      card('Guest memory', (vm.memory_mib ?? 0) + ' / ' + (vm.memory_budget_mib ?? 0) + ' MiB', 'of the budget', vm.memory_mib || 0, vm.memory_budget_mib || 0),
      card('Seats kept', sv.seats.kept + ' / ' + sv.seats.cap, 'boot records')),
    el('h3', {}, 'Leases'),
    el('table', { id: 'leases' },
      el('thead', {}, el('tr', {}, ['Address', 'MAC', 'Host', 'State', 'Expires in'].map((h) => el('th', {}, h)))),
      el('tbody', {}, d.leases.map((l) => el('tr', {},
        el('td', { class: 'mono' }, l.ip), el('td', { class: 'mono' }, l.mac || '—'), el('td', {}, l.hostname || ''),
        el('td', {}, l.state), el('td', {}, age(l.expires_in)))))),
    el('h3', {}, 'Recent events ', pick),
    events(sv.events),
  ];
}

// ---- The loop.
function route() {
  const h = location.hash || '#/room';
  const m = h.match(/^#\/seat\/([0-9a-fA-F:]{17})$/);
  if (m) return { page: 'seat', mac: m[1].toLowerCase() };
  if (h === '#/sessions') return { page: 'sessions' };
  if (h === '#/server') return { page: 'server' };
  return { page: 'room' };
}

let busy = false;
async function poll() {
  if (busy || document.hidden) return;
  busy = true;
  try {
    const r = route();
    const v = await get('/admin/api/state');
    state = v;
    csrf = v.csrf;
    let nodes;
    if (r.page === 'seat') nodes = seatView(v, await get('/admin/api/seat/' + r.mac));
    else if (r.page === 'sessions') nodes = sessionsView(v);
    else if (r.page === 'server') nodes = serverView(v, await get('/admin/api/server' + (eventSeat ? '?seat=' + eventSeat : '')));
    else nodes = room(v);
    const view = document.getElementById('view');
    const open = [...view.querySelectorAll('details[open]')].map((d) => d.querySelector('summary').textContent);
    view.replaceChildren(...nodes.flat().filter((n) => n));
    for (const d of view.querySelectorAll('details')) if (open.includes(d.querySelector('summary').textContent)) d.open = true;
    view.dataset.page = r.page;
    view.dataset.updated = String(Date.now());
    for (const a of document.querySelectorAll('header nav a')) a.classList.toggle('active', a.id === 'nav-' + (r.page === 'seat' ? 'room' : r.page));
    document.getElementById('status').textContent = 'updated ' + new Date().toLocaleTimeString();
  } catch (e) {
    document.getElementById('status').textContent = 'not updated: ' + e.message;
  } finally {
    busy = false;
  }
}

document.getElementById('logout').addEventListener('click', async () => {
  try { await post('/admin/logout'); } finally { location.href = '/admin/'; }
});
addEventListener('hashchange', poll);
document.addEventListener('visibilitychange', () => { if (!document.hidden) { poll(); refreshScreens(); } });
setInterval(poll, POLL_MS);
setInterval(refreshScreens, SCREEN_MS);
poll();
