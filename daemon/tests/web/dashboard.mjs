// Drives Debian's Chromium (headless, through playwright-core) through the daemon's web
// dashboard and prints what a person would see, as one JSON object on stdout, for
// daemon/tests/web.rs to check against the API. Screenshots go to OUT_DIR.
//
//   node dashboard.mjs open   BASE_URL OUT_DIR DONE_JOB RUNNING_JOB QUEUED_JOB
//   node dashboard.mjs tokens BASE_URL OUT_DIR SECRET OTHERS_JOB OWN_JOB
import { chromium } from "playwright-core";

const [mode, base, out, ...rest] = process.argv.slice(2);
const chromiumPath = process.env.CHROMIUM || "/usr/bin/chromium";
const browser = await chromium.launch({
  executablePath: chromiumPath,
  // As root in a container, without a GPU, and with no network beyond loopback.
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
const result = {};
try {
  const context = await browser.newContext({ viewport: { width: 1400, height: 1000 } });
  const page = await context.newPage();
  const consoleErrors = [];
  page.on("console", (m) => m.type() === "error" && consoleErrors.push(m.text()));
  page.on("pageerror", (e) => consoleErrors.push(e.message));
  page.setDefaultTimeout(30000);
  if (mode === "open") await openDaemon(page, rest.map(Number));
  else await withTokens(page, rest[0], Number(rest[1]), Number(rest[2]));
  result.console_errors = consoleErrors;
} finally {
  await browser.close();
}
console.log(JSON.stringify(result));

async function rowTexts(page, selector) {
  return page.$$eval(selector, (rows) => rows.map((r) => [...r.querySelectorAll("td")].map((td) => td.textContent.trim())));
}

async function openDaemon(page, [done, running, queued]) {
  // The jobs list, then the finished job's row.
  await page.goto(`${base}/`);
  await page.waitForSelector(`#jobs tr[data-job="${done}"]`);
  await page.waitForSelector(`#jobs tr[data-job="${running}"]`);
  result.jobs = await rowTexts(page, "#jobs tbody tr");
  await page.screenshot({ path: `${out}/jobs.png`, fullPage: true });

  // Filtering by state keeps only those jobs.
  await page.selectOption("#state-filter", "succeeded");
  await page.waitForURL(/\?state=succeeded/);
  await page.waitForFunction(() => [...document.querySelectorAll("#jobs tbody tr[data-job]")].every((r) => r.textContent.includes("succeeded")) && document.querySelector("#jobs tbody tr[data-job]"));
  result.succeeded_filter = await page.$$eval("#jobs tbody tr[data-job]", (rows) => rows.map((r) => Number(r.dataset.job)));

  // The finished job's page: its charts hold every step, the logs end, the checkpoints are listed.
  await page.goto(`${base}/jobs/${done}`);
  await page.waitForFunction(() => document.getElementById("log-state")?.textContent.startsWith("the job is over"));
  await page.waitForFunction(() => Number(document.querySelector("#chart-loss")?.dataset.points) > 0 && document.querySelectorAll("#checkpoints tbody tr td").length > 1);
  result.job_title = (await page.textContent("h1")).trim();
  result.charts = await page.evaluate(() =>
    Object.fromEntries(Object.entries(window.gantry.charts).map(([k, c]) => {
      const canvas = document.querySelector(`#chart-${k} canvas`);
      // How much of the series is drawn: pixels in rank 0's line colour (#2f6fde); the axes and
      // grid are grey, so a chart with no line has none.
      let series = 0;
      if (canvas) {
        const px = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
        for (let i = 0; i < px.length; i += 4) {
          const near = Math.abs(px[i] - 0x2f) + Math.abs(px[i + 1] - 0x6f) + Math.abs(px[i + 2] - 0xde) < 60;
          series += near && px[i + 3] > 128 ? 1 : 0;
        }
      }
      return [k, { steps: c.data ? c.data[0] : [], values: c.data ? c.data.slice(1) : [], series_pixels: series, canvas: !!canvas }];
    })),
  );
  result.events = await page.$$eval("#events li", (li) => li.map((l) => l.textContent));
  result.checkpoints = await rowTexts(page, "#checkpoints tbody tr");
  result.logs = await page.textContent("#logs");
  result.cancel_button = (await page.$("#cancel")) !== null;
  await page.screenshot({ path: `${out}/job.png`, fullPage: true });

  // The queue: the waiting job and why it waits.
  await page.goto(`${base}/queue`);
  await page.waitForSelector(`#queue tr[data-job="${queued}"]`);
  result.queue = await rowTexts(page, "#queue tbody tr");
  await page.screenshot({ path: `${out}/queue.png`, fullPage: true });

  // The devices: who holds what.
  await page.goto(`${base}/devices`);
  await page.waitForSelector("#devices tr[data-device]");
  await page.waitForFunction((id) => document.querySelector("#devices tbody").textContent.includes(`#${id}`), running);
  result.devices = await rowTexts(page, "#devices tbody tr");
  await page.screenshot({ path: `${out}/devices.png`, fullPage: true });

  // A bad spec: the error names the field, next to the text, and the line at fault.
  await page.goto(`${base}/submit`);
  const bad = await import("node:fs").then((fs) => fs.readFileSync(`${out}/bad.toml`, "utf8"));
  await page.fill("#spec-text", bad);
  await page.click("#submit");
  await page.waitForSelector("#spec-error .field-error");
  result.field_error = { field: await page.getAttribute("#spec-error", "data-field"), text: (await page.textContent("#spec-error")).trim() };
  result.still_on_submit = new URL(page.url()).pathname === "/submit";
  await page.screenshot({ path: `${out}/submit.png`, fullPage: true });

  // A good one (TOML) is submitted and opens its page.
  const good = await import("node:fs").then((fs) => fs.readFileSync(`${out}/good.toml`, "utf8"));
  await page.fill("#spec-text", good);
  await page.click("#submit");
  await page.waitForURL(/\/jobs\/\d+$/);
  result.submitted = Number(new URL(page.url()).pathname.split("/").pop());
  await page.waitForFunction(() => document.title.endsWith("· Gantry"));
  result.submitted_title = await page.title();

  // Cancel the running job from its page (the browser's confirm dialog accepted).
  // Its charts grow while it trains: new steps arrive without a reload.
  await page.goto(`${base}/jobs/${running}`);
  await page.waitForFunction(() => Number(document.querySelector("#chart-loss")?.dataset.points) > 0);
  const before = Number(await page.getAttribute("#chart-loss", "data-points"));
  await page.waitForFunction((n) => Number(document.querySelector("#chart-loss").dataset.points) > n, before);
  result.live_points = [before, Number(await page.getAttribute("#chart-loss", "data-points"))];
  page.once("dialog", (d) => d.accept());
  await page.click("#cancel");
  await page.waitForFunction(() => document.querySelector("h1 .state")?.textContent === "cancelled");
  result.cancelled_badge = await page.textContent("h1 .state");
}

async function withTokens(page, secret, othersJob, ownJob) {
  await page.goto(`${base}/`);
  await page.waitForSelector("#token-form");
  result.asked = true;
  await page.screenshot({ path: `${out}/token.png`, fullPage: true });
  // A wrong token is refused and forgotten: the page asks again, saying so.
  await page.fill("#token-form input", "gantry_not-a-token");
  await page.click("#token-form button");
  await page.waitForFunction(() => document.getElementById("token-why")?.textContent.startsWith("The token was refused"));
  result.refused = (await page.textContent("#token-why")).trim();
  await page.fill("#token-form input", secret);
  await page.click("#token-form button");
  await page.waitForSelector(`#jobs tr[data-job="${ownJob}"]`);
  result.who = (await page.textContent("#who")).trim();
  // Asked once: a new page of the same browser does not ask again.
  await page.goto(`${base}/jobs/${othersJob}`);
  await page.waitForFunction(() => document.title.endsWith("· Gantry"));
  result.asked_again = (await page.$("#token-form")) !== null;
  result.cancel_on_others_job = (await page.$("#cancel")) !== null;
  await page.goto(`${base}/jobs/${ownJob}`);
  await page.waitForFunction(() => document.title.endsWith("· Gantry"));
  result.cancel_on_own_job = (await page.$("#cancel")) !== null;
  await page.screenshot({ path: `${out}/own-job.png`, fullPage: true });
  // Signing out forgets the token: the page asks again.
  await page.click("#sign-out");
  await page.waitForSelector("#token-form");
  result.asked_after_sign_out = true;
}
