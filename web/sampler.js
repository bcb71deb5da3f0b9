// The sampling side of snapfusion-min in JavaScript, written to read beside the Python: CLIP's BPE tokenizer
// (text_encoder.Tokenizer), one seeded Gaussian generator written in both languages (export/web.py's
// portable_noise), the timestep grids (diffusion.timesteps) and DDIM with classifier-free guidance (Eq. 2, 3, 6).
// No dependencies: the page (index.html) runs the ONNX files with onnxruntime-web; node runs this file in the tests.

// ---- CLIP's BPE tokenizer (open_clip's SimpleTokenizer, padded as SD pads: text_encoder.Tokenizer) ----------------

// bytes_to_unicode: every byte gets a printable character; BPE works on those.
function bytesToUnicode() {
  const bs = [];
  for (let b = 33; b <= 126; b++) bs.push(b);
  for (let b = 161; b <= 172; b++) bs.push(b);
  for (let b = 174; b <= 255; b++) bs.push(b);
  const cs = bs.slice();
  let n = 0;
  for (let b = 0; b < 256; b++) {
    if (!bs.includes(b)) { bs.push(b); cs.push(256 + n); n++; }
  }
  const table = new Array(256);
  bs.forEach((b, i) => { table[b] = String.fromCodePoint(cs[i]); });
  return table;
}

const SPECIAL = { "<start_of_text>": "sot", "<end_of_text>": "eot" };
const PATTERN = /<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+/giu;

// html.unescape for what prompts carry (named &amp; &lt; &gt; &quot; &apos; &nbsp; and numeric references); ftfy's
// mojibake repair is not done here (docs/web.md).
function unescapeHtml(text) {
  const named = { amp: "&", lt: "<", gt: ">", quot: '"', apos: "'", nbsp: "\u00a0" };
  return text.replace(/&(#x[0-9a-f]+|#[0-9]+|[a-z]+);/gi, (whole, body) => {
    if (body[0] === "#") {
      const code = body[1] === "x" || body[1] === "X" ? parseInt(body.slice(2), 16) : parseInt(body.slice(1), 10);
      return code > 0 && code <= 0x10ffff ? String.fromCodePoint(code) : whole;
    }
    return named[body.toLowerCase()] ?? whole;
  });
}

// open_clip's clean='lower': basic_clean (NFC, html.unescape twice, strip), whitespace_clean, lower case.
export function cleanText(text) {
  text = unescapeHtml(unescapeHtml(text.normalize("NFC"))).trim();
  return text.split(/\s+/).filter(Boolean).join(" ").toLowerCase();
}

export class Tokenizer {
  // vocab: {symbol: id} (vocab.json); merges: merges.txt's text; settings: snapfusion_min.json's "tokenizer".
  constructor(vocab, merges, settings) {
    this.encoder = vocab;
    this.ranks = new Map();
    merges.split("\n").slice(1).filter(Boolean).forEach((line, i) => this.ranks.set(line, i));
    this.byteChar = bytesToUnicode();
    this.contextLength = settings.context_length;
    this.sot = settings.sot;
    this.eot = settings.eot;
    this.cache = new Map();
  }

  // One pre-token's BPE: merge the lowest-ranked adjacent pair until none is in merges.txt.
  bpe(token) {
    if (this.cache.has(token)) return this.cache.get(token);
    let word = [...token];
    word[word.length - 1] += "</w>";
    while (word.length > 1) {
      let best = null, bestRank = Infinity;
      for (let i = 0; i < word.length - 1; i++) {
        const rank = this.ranks.get(word[i] + " " + word[i + 1]);
        if (rank !== undefined && rank < bestRank) { best = [word[i], word[i + 1]]; bestRank = rank; }
      }
      if (best === null) break;
      const merged = [];
      for (let i = 0; i < word.length; i++) {
        if (i < word.length - 1 && word[i] === best[0] && word[i + 1] === best[1]) { merged.push(best[0] + best[1]); i++; }
        else merged.push(word[i]);
      }
      word = merged;
    }
    this.cache.set(token, word);
    return word;
  }

  encode(text) {
    const ids = [];
    for (const [token] of cleanText(text).matchAll(PATTERN)) {
      if (token in SPECIAL) { ids.push(this[SPECIAL[token]]); continue; }
      const chars = [...new TextEncoder().encode(token)].map((b) => this.byteChar[b]).join("");
      for (const symbol of this.bpe(chars)) ids.push(this.encoder[symbol]);
    }
    return ids;
  }

  // SOT, BPE (truncated), EOT, padded with EOT to the context length: an Int32Array the text encoder takes.
  call(prompt) {
    const n = this.contextLength;
    const ids = [this.sot, ...this.encode(prompt).slice(0, n - 2), this.eot];
    while (ids.length < n) ids.push(this.eot);
    return Int32Array.from(ids);
  }
}

// ---- one seeded Gaussian generator, the same numbers in Python (export/web.py) -----------------------------------

// mulberry32: a 32-bit state, one uniform in (0, 1) per call (never 0: Box-Muller takes its log).
function mulberry32(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = Math.imul(a ^ (a >>> 15), 1 | a);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return (((t ^ (t >>> 14)) >>> 0) + 0.5) / 4294967296;
  };
}

// n standard normal numbers (Box-Muller, both of each pair), as float32: z_T for one image.
export function portableNoise(seed, n) {
  const uniform = mulberry32(seed);
  const out = new Float32Array(n);
  for (let i = 0; i < n; i += 2) {
    const r = Math.sqrt(-2 * Math.log(uniform())), theta = 2 * Math.PI * uniform();
    out[i] = r * Math.cos(theta);
    if (i + 1 < n) out[i + 1] = r * Math.sin(theta);
  }
  return out;
}

// ---- the sampler: timestep grids, DDIM (Eq. 2) on v- or eps-prediction (Eq. 6), CFG (Eq. 3) -----------------------

export const CLEAN = -1; // the grid's last point of a trailing grid: clean data, alpha 1, sigma 0

// diffusion.timesteps: the N + 1 points of an N-step sampler.
export function timesteps(steps, spacing, trainSteps = 1000) {
  const grid = [];
  if (spacing === "leading") {
    const ratio = Math.floor(trainSteps / steps);
    for (let i = 0; i < steps; i++) grid.push((steps - 1 - i) * ratio + 1);
    return [...grid, 0];
  }
  if (spacing === "trailing") {
    // round(1000 (N - i) / N) - 1, halves to even as Python's round of a Fraction
    for (let i = 0; i < steps; i++) {
      const num = trainSteps * (steps - i), q = Math.floor(num / steps), r = num - q * steps;
      const up = 2 * r > steps || (2 * r === steps && q % 2 === 1);
      grid.push(q + (up ? 1 : 0) - 1);
    }
    return [...grid, CLEAN];
  }
  throw new Error(`unknown spacing ${spacing}`);
}

export function alphaSigma(alphasCumprod, t) {
  if (t < 0) return [1, 0];
  return [Math.sqrt(alphasCumprod[t]), Math.sqrt(1 - alphasCumprod[t])];
}

// One DDIM step from z at t to t_next given the network's (guided) output: x-hat and eps-hat (Eq. 6 solved for
// v-prediction: x = alpha z - sigma v, eps = sigma z + alpha v), then z' = alpha' x + sigma' eps. Returns [z', x].
export function ddimStep(z, out, t, tNext, alphasCumprod, prediction) {
  const [a, s] = alphaSigma(alphasCumprod, t), [a2, s2] = alphaSigma(alphasCumprod, tNext);
  const next = new Float32Array(z.length), x = new Float32Array(z.length);
  for (let i = 0; i < z.length; i++) {
    const xi = prediction === "v" ? a * z[i] - s * out[i] : (z[i] - s * out[i]) / a;
    const ei = prediction === "v" ? s * z[i] + a * out[i] : out[i];
    x[i] = xi;
    next[i] = a2 * xi + s2 * ei;
  }
  return [next, x];
}

// CFG (Eq. 3) on a [uncond; cond] batch output: uncond + w (cond - uncond).
export function guide(batchOut, w) {
  const n = batchOut.length / 2, out = new Float32Array(n);
  for (let i = 0; i < n; i++) out[i] = batchOut[i] + w * (batchOut[n + i] - batchOut[i]);
  return out;
}
