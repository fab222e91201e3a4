// A small time-series line chart on a <canvas> (no library): lines with gaps at null values,
// a legend with each series' last value, and vertical markers (rollbacks) on the time axis.
"use strict";

class LineChart {
  // series: [{key, label, color}]; opts: {yMin, yMax, digits}
  constructor(canvas, series, opts) {
    this.canvas = canvas;
    this.series = series;
    this.opts = Object.assign({yMin: 0, yMax: null, digits: 1}, opts || {});
  }

  draw(rows, markers) {
    const c = this.canvas, dpr = window.devicePixelRatio || 1;
    const w = c.clientWidth, h = c.clientHeight;
    if (c.width !== Math.round(w * dpr) || c.height !== Math.round(h * dpr)) {
      c.width = Math.round(w * dpr);
      c.height = Math.round(h * dpr);
    }
    const g = c.getContext("2d");
    g.setTransform(dpr, 0, 0, dpr, 0, 0);
    g.clearRect(0, 0, w, h);
    g.font = "11px system-ui, sans-serif";
    const left = 46, right = 8, top = 18, bottom = 18;
    const pw = w - left - right, ph = h - top - bottom;
    if (!rows.length || pw <= 0 || ph <= 0) return;
    const t0 = rows[0].t, t1 = Math.max(rows[rows.length - 1].t, t0 + 10);
    let lo = this.opts.yMin, hi = this.opts.yMax;
    const values = [];
    for (const s of this.series) for (const r of rows) if (r[s.key] != null) values.push(r[s.key]);
    if (lo == null) lo = values.length ? Math.min(...values) : 0;
    if (hi == null) hi = values.length ? Math.max(...values) : 1;
    if (hi <= lo) hi = lo + 1;
    hi += (hi - lo) * 0.05;
    const x = t => left + (t - t0) / (t1 - t0) * pw;
    const y = v => top + ph - (v - lo) / (hi - lo) * ph;
    // grid and y labels
    g.strokeStyle = "#e6e9ed"; g.fillStyle = "#6b7580"; g.lineWidth = 1;
    const axisDigits = hi - lo < 3 ? Math.max(this.opts.digits, 2) : this.opts.digits;
    for (let i = 0; i <= 3; i++) {
      const v = lo + (hi - lo) * i / 3, yy = y(v);
      g.beginPath(); g.moveTo(left, yy); g.lineTo(left + pw, yy); g.stroke();
      g.fillText(fmt(v, axisDigits), 2, yy + 4);
    }
    // time labels: seconds before the newest row
    for (let i = 0; i <= 4; i++) {
      const t = t0 + (t1 - t0) * i / 4, ago = Math.round(t1 - t);
      const label = i === 4 ? "now" : ago >= 120 ? `-${Math.round(ago / 60)} min` : `-${ago} s`;
      g.fillText(label, Math.min(x(t) - 10, w - 26), h - 4);
    }
    // rollback markers
    g.strokeStyle = "#d93025"; g.lineWidth = 1.5;
    for (const m of markers || []) {
      if (m.t < t0 || m.t > t1) continue;
      g.beginPath(); g.moveTo(x(m.t), top); g.lineTo(x(m.t), top + ph); g.stroke();
    }
    // lines
    g.lineWidth = 1.6;
    let lx = left;
    for (const s of this.series) {
      g.strokeStyle = s.color; g.beginPath();
      let pen = false, last = null;
      for (const r of rows) {
        const v = r[s.key];
        if (v == null) { pen = false; continue; }
        if (pen) g.lineTo(x(r.t), y(v)); else g.moveTo(x(r.t), y(v));
        pen = true; last = v;
      }
      g.stroke();
      const label = `${s.label} ${last == null ? "–" : fmt(last, this.opts.digits)}`;
      g.fillStyle = s.color; g.fillRect(lx, 5, 8, 8);
      g.fillStyle = "#1d232b"; g.fillText(label, lx + 11, 13);
      lx += g.measureText(label).width + 22;
    }
  }
}

function fmt(v, digits) {
  if (Math.abs(v) >= 10000) return (v / 1000).toFixed(0) + "k";
  if (Math.abs(v) >= 100) return v.toFixed(0);
  return v.toFixed(digits);
}
