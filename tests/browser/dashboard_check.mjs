// Drives the Backstop dashboard in headless Chromium (the system package)
// and checks that it reflects breaker changes live.
//
// Usage: node dashboard_check.mjs <dashboard url> <target> <screenshot.png>
// Protocol on stdout (read by tests/e2e_dashboard.rs):
//   "closed"  once the target's card is shown closed  -> the test forces it open
//   "ok"      once the card shows FORCED OPEN (colour and badge)
import { chromium } from "playwright-core";

const [url, target, shot] = process.argv.slice(2);
const executablePath = process.env.CHROMIUM || "/usr/bin/chromium";
const browser = await chromium.launch({
  executablePath,
  headless: true,
  args: [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
  ],
});
try {
  const page = await browser.newPage();
  page.on("pageerror", (e) => { console.error("page error:", e.message); process.exitCode = 3; });
  await page.goto(url);
  const card = page.locator(`.card[data-target="${target}"]`);
  await card.waitFor({ timeout: 15000 });
  await page.waitForFunction(
    (t) => document.querySelector(`.card[data-target="${t}"]`)?.dataset.state === "closed",
    target, { timeout: 15000 });
  console.log("closed");
  await page.waitForFunction(
    (t) => document.querySelector(`.card[data-target="${t}"]`)?.dataset.state === "forced_open",
    target, { timeout: 15000 });
  const badge = (await card.locator(".state").textContent()).trim();
  if (badge !== "FORCED OPEN") throw new Error(`badge says ${JSON.stringify(badge)}`);
  const colour = await card.evaluate((el) => getComputedStyle(el).borderLeftColor);
  if (colour === "rgb(47, 179, 107)") throw new Error("the card is still green");
  await page.waitForFunction(
    (t) => document.querySelector(`.card[data-target="${t}"] .cause`)?.textContent.includes("browser test"),
    target, { timeout: 15000 });
  const log = await page.locator("#log").textContent();
  if (!log.includes(target)) throw new Error(`the transition is not in the log: ${log}`);
  if (shot) await page.screenshot({ path: shot, fullPage: true });
  console.log("ok");
} finally {
  await browser.close();
}
