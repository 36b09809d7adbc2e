#!/usr/bin/env node
// Times ONNX models with onnxruntime-node (ONNX Runtime's Node.js binding, CPU execution provider).
// Driven by bench/ort_compare.py; see bench/README.md ("ort_compare.py").
//
//   NODE_PATH=DIR/node_modules node bench/ort_runner.js time JOBS.json      one JSON object on stdout
//   NODE_PATH=DIR/node_modules node bench/ort_runner.js parity MODEL IN.bin B T OUT.bin
//
// JOBS.json: {"min_time": s, "min_calls": n, "max_calls": n, "warmup": n,
//             "jobs": [{"name": ..., "model": path, "B": b, "T": t, "emb": e, "threads": n}, ...]}
// Every job gets its own session: graphOptimizationLevel 'all', intraOpNumThreads = threads,
// interOpNumThreads 1, executionMode 'sequential'. The input is one float32 [B, T, emb] tensor named "x"
// (uniform in [-1, 1), fixed seed), created once per job; each call is `await session.run({x})`, timed on its
// own with process.hrtime.bigint(), after `warmup` untimed calls. Calls continue until both min_time seconds
// and min_calls calls are reached (or max_calls). Reported: median, min, mean, the per-call times (ms).
'use strict';

const fs = require('fs');
const ort = require('onnxruntime-node');

function sessionOptions(threads) {
  return {
    executionProviders: ['cpu'],
    graphOptimizationLevel: 'all',
    intraOpNumThreads: threads,
    interOpNumThreads: 1,
    executionMode: 'sequential',
  };
}

function randomInput(n, seed) {
  // xorshift32: the same input for every model of a shape, no dependency on Math.random.
  let s = seed >>> 0 || 1;
  const a = new Float32Array(n);
  for (let i = 0; i < n; ++i) {
    s ^= s << 13; s >>>= 0;
    s ^= s >>> 17;
    s ^= s << 5; s >>>= 0;
    a[i] = (s / 4294967296) * 2 - 1;
  }
  return a;
}

function median(v) {
  const s = [...v].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
}

async function timeJob(job, cfg) {
  const session = await ort.InferenceSession.create(job.model, sessionOptions(job.threads));
  const x = new ort.Tensor('float32', randomInput(job.B * job.T * job.emb, 12345 + job.B * 7919 + job.T),
                           [job.B, job.T, job.emb]);
  const feeds = { x };
  const outName = session.outputNames[0];
  let out;
  for (let i = 0; i < cfg.warmup; ++i) out = await session.run(feeds);
  const times = [];
  const t0 = process.hrtime.bigint();
  while (times.length < cfg.max_calls) {
    const s = process.hrtime.bigint();
    out = await session.run(feeds);
    times.push(Number(process.hrtime.bigint() - s) / 1e6);
    const elapsed = Number(process.hrtime.bigint() - t0) / 1e9;
    if (times.length >= cfg.min_calls && elapsed >= cfg.min_time) break;
  }
  const dims = out[outName].dims;
  if (typeof session.release === 'function') await session.release();
  return {
    name: job.name, model: job.model, B: job.B, T: job.T, threads: job.threads, output_dims: dims,
    calls: times.length, median_ms: median(times), min_ms: Math.min(...times),
    mean_ms: times.reduce((a, b) => a + b, 0) / times.length, times_ms: times,
  };
}

async function main() {
  const [mode, ...rest] = process.argv.slice(2);
  if (mode === 'time') {
    const cfg = JSON.parse(fs.readFileSync(rest[0], 'utf8'));
    const results = [];
    for (const job of cfg.jobs) {
      const r = await timeJob(job, cfg);
      process.stderr.write(`  ort ${job.name} B=${job.B} T=${job.T} threads=${job.threads}: ` +
                           `${r.median_ms.toFixed(3)} ms (median of ${r.calls})\n`);
      results.push(r);
    }
    process.stdout.write(JSON.stringify({ ort_version: ort.env.versions, node: process.version, results }));
  } else if (mode === 'parity') {
    const [model, inPath, b, t, outPath] = rest;
    const buf = fs.readFileSync(inPath);
    const data = new Float32Array(buf.buffer, buf.byteOffset, buf.byteLength / 4);
    const B = Number(b), T = Number(t);
    const session = await ort.InferenceSession.create(model, sessionOptions(1));
    const out = await session.run({ x: new ort.Tensor('float32', Float32Array.from(data), [B, T, data.length / (B * T)]) });
    const y = out[session.outputNames[0]];
    fs.writeFileSync(outPath, Buffer.from(y.data.buffer, y.data.byteOffset, y.data.byteLength));
    process.stdout.write(JSON.stringify({ dims: y.dims, ort_version: ort.env.versions }) + '\n');
  } else {
    process.stderr.write('usage: ort_runner.js time JOBS.json | parity MODEL IN.bin B T OUT.bin\n');
    process.exit(2);
  }
}

main().catch((e) => { process.stderr.write(String(e && e.stack || e) + '\n'); process.exit(1); });
