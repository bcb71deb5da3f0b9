// Drives the browser page (web/index.html) in headless Chromium for tests/test_web_page.py, which asserts on what
// this prints: the page's console errors, its status, each image's RGBA pixels and caption, and the robust image
// again after one block is unticked. Input (stdin, JSON): {url, chromium, webDir, untick, screenshot, timeoutMs}.
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";

const input = JSON.parse(readFileSync(0, "utf8"));
const { chromium } = createRequire(`${input.webDir}/package.json`)("playwright-core"); // web/'s node_modules

const browser = await chromium.launch({
  executablePath: input.chromium,
  args: ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"],
});
const out = { console: [], errors: [] };
try {
  const page = await browser.newPage({ viewport: { width: 1000, height: 1500 } });
  page.on("console", (m) => { if (["error", "warning"].includes(m.type())) out.console.push(`${m.type()}: ${m.text()}`); });
  page.on("pageerror", (e) => out.errors.push(e.message));
  page.on("requestfailed", (r) => out.errors.push(`request failed: ${r.url()}`));

  const settled = async () => {
    await page.waitForFunction(() => {
      const status = document.querySelector("#status").textContent;
      return status === "done" || status.startsWith("error");
    }, null, { timeout: input.timeoutMs });
    return page.textContent("#status");
  };
  const pixels = (figure) => page.$eval(`${figure} canvas.image`, (canvas) => { // read from a copy: the page's own
    const copy = document.createElement("canvas"); // canvas stays unread (Chromium warns about repeated readbacks)
    [copy.width, copy.height] = [canvas.width, canvas.height];
    const context = copy.getContext("2d", { willReadFrequently: true });
    context.drawImage(canvas, 0, 0);
    return Array.from(context.getImageData(0, 0, copy.width, copy.height).data).concat([copy.width]);
  });
  const look = async (figure) => {
    const data = await pixels(figure);
    return { width: data.pop(), rgba: data, caption: await page.textContent(`${figure} figcaption`) };
  };

  await page.goto(input.url);
  out.status = await settled();
  out.form = await page.evaluate(() => Object.fromEntries(["prompt", "seed", "steps", "guidance"].map(
    (id) => [id, document.getElementById(id).value])));
  out.blocks = await page.$$eval("[data-block]", (boxes) => boxes.map((b) => b.dataset.block));
  for (const name of ["teacher", "student", "robust"]) out[name] = await look(`#${name}`);
  out.strip = await page.$$eval("#teacher .strip canvas", (c) => c.length);
  if (input.screenshot) await page.screenshot({ path: input.screenshot, fullPage: true });
  if (input.untick) {
    await page.uncheck(`[data-block="${input.untick}"]`); // its handler says "switching blocks…" before it awaits
    out.toggledStatus = await settled();
    out.toggled = await look("#robust");
  }
} finally {
  await browser.close();
}
console.log(JSON.stringify(out));
