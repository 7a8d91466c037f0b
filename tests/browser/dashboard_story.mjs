// The dashboard for the person on call, in headless Chromium (Debian's
// chromium package). One scenario per run, driven by tests/e2e_dashboard.rs
// through a line protocol on stdout (the test reads a line, acts, the
// script waits for the page to show it).
//
// node dashboard_story.mjs history <url> <forced target> <busy target> <route> <screenshot.png>
//   "events <n>"  the events from before the page opened are listed
//   "sparks"      the busy target's sparkline is drawn -> the test sends traffic
//   "moved"       the sparkline moved
//   "ok"          routes and spend panels, header, narrow window and screenshot checked
// node dashboard_story.mjs many <url> <count> <screenshot.png>
//   "render <json>"  how long the first full list render took (the test asserts)
//   "ok"             search, filter and narrow window checked
// node dashboard_story.mjs operator <url> <target> <operator token>
//   "forced"      the operator signed in, saw the buttons, confirmed, and the card shows FORCED OPEN
// node dashboard_story.mjs viewer <url> <target> <viewer token>
//   "refused <unauthenticated status> <viewer status>"  no buttons; both POSTs refused
import { chromium } from "playwright-core";

const [mode, url, ...rest] = process.argv.slice(2);
const executablePath = process.env.CHROMIUM || "/usr/bin/chromium";
const browser = await chromium.launch({
  executablePath,
  headless: true,
  args: [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
  ],
});
const T = 20000;
const cardSel = (t) => `.card[data-target="${t.replace(/"/g, '\\"')}"]`;

async function open(viewport = { width: 1280, height: 900 }) {
  const page = await browser.newPage({ viewport });
  page.on("pageerror", (e) => { console.error("page error:", e.message); process.exitCode = 3; });
  return page;
}

async function noHorizontalScroll(page, what) {
  await page.setViewportSize({ width: 400, height: 800 });
  await page.waitForTimeout(200);
  const { sw, w } = await page.evaluate(() => ({ sw: document.documentElement.scrollWidth, w: window.innerWidth }));
  if (sw > w + 1) throw new Error(`${what}: at 400 px the page scrolls sideways (scrollWidth ${sw})`);
}

async function signIn(page, token) {
  await page.goto(url);
  await page.fill('input[name="token"]', token);
  await Promise.all([page.waitForNavigation(), page.click('input[type="submit"]')]);
}

async function history([forced, busy, route, shot]) {
  const page = await open();
  await page.goto(url);
  // (a) What happened before the page opened is listed, with a time.
  await page.waitForFunction(
    (t) => [...document.querySelectorAll("#log li.before")].some((li) => li.textContent.includes(t) && li.textContent.includes("before the page opened")),
    forced, { timeout: T });
  const n = await page.locator("#log li.before").count();
  const time = await page.locator("#log li.before .t").first().textContent();
  if (!/\d{1,2}:\d{2}/.test(time)) throw new Error(`the event has no readable time: ${time}`);
  console.log(`events ${n}`);
  // The header says live and how long ago, never a raw sequence number.
  await page.waitForFunction(() => /^live · (last event .* ago|no events yet)$/.test(document.getElementById("conn").textContent), null, { timeout: T });
  const head = await page.locator("header").textContent();
  if (/\d{10,}/.test(head)) throw new Error(`the header shows a raw number: ${head}`);
  // (b) The busy target's sparkline moves when traffic flows.
  const spark = `${cardSel(busy)} .spark.calls`;
  await page.waitForSelector(`${spark} polyline.admitted`, { timeout: T });
  const before = await page.evaluate((s) => ({
    sum: Number(document.querySelector(s).dataset.sum),
    pts: document.querySelector(s + " polyline.admitted").getAttribute("points"),
  }), spark);
  console.log("sparks");
  await page.waitForFunction(([s, sum, pts]) => {
    const el = document.querySelector(s);
    return el && Number(el.dataset.sum) > sum && el.querySelector("polyline.admitted").getAttribute("points") !== pts;
  }, [spark, before.sum, before.pts], { timeout: T });
  await page.waitForSelector(`${cardSel(busy)} .spark.latency polyline.p99[points*=","]`, { state: "attached", timeout: T });
  console.log("moved");
  // Routes: the forced-open primary is passed over; the busy one is chosen now.
  await page.waitForFunction(([r, b]) => document.querySelector(`.route[data-route="${r}"] li.chosen`)?.dataset.target === b,
    [route, busy], { timeout: T });
  // The route's end-to-end line is there (figures, or how to get them).
  await page.waitForFunction((r) => /requests end to end|no user requests finished yet/
    .test(document.querySelector(`.route[data-route="${r}"] .requests`)?.textContent || ""), route, { timeout: T });
  // The route's spend limit has its own row (a day's 25, nothing spent).
  await page.waitForFunction((r) => {
    const row = document.querySelector(`#spendpanel:not([hidden]) tr[data-scope="route:${r}"]`);
    return row && /25\.00 \/ day/.test(row.textContent);
  }, route, { timeout: T });
  // State by text and shape as well as colour.
  const badge = await page.locator(`${cardSel(forced)} .state`).evaluate((el) => ({
    text: el.textContent.trim(), shape: getComputedStyle(el, "::before").content,
  }));
  if (badge.text !== "FORCED OPEN" || !badge.shape || badge.shape === "none") throw new Error(`state badge: ${JSON.stringify(badge)}`);
  // Read-only without credentials configured? No: with no [auth] and no admin
  // token, anyone may act, as with gRPC Admin; the buttons are there.
  if (shot) await page.screenshot({ path: shot, fullPage: true });
  await noHorizontalScroll(page, "history");
  console.log("ok");
}

async function many([count, shot]) {
  const page = await open();
  await page.goto(url);
  const want = Number(count);
  await page.waitForFunction((n) => window.backstopRender && window.backstopRender.count === n, want, { timeout: T });
  const r = await page.evaluate(() => window.backstopRender);
  console.log("render " + JSON.stringify(r));
  // Search narrows the list to one card.
  const last = "target-" + String(want - 1).padStart(4, "0");
  await page.fill("#q", last);
  await page.waitForFunction((t) => {
    const cs = document.querySelectorAll("#targets .card");
    return cs.length === 1 && cs[0].dataset.target === t;
  }, last, { timeout: T });
  await page.fill("#q", "");
  // Filter by state: one target is forced open.
  await page.selectOption("#filter", "forced_open");
  await page.waitForFunction(() => document.querySelectorAll("#targets .card").length === 1 &&
    document.querySelector("#targets .card").dataset.state === "forced_open", null, { timeout: T });
  await page.selectOption("#filter", "");
  // Sort by most refused: the target the test refused comes first.
  await page.selectOption("#sort", "refused");
  await page.waitForFunction(() => document.querySelector("#targets .card")?.dataset.target === "target-0500", null, { timeout: T });
  // Scrolling to the end of the list shows more cards.
  const first = await page.locator("#targets .card").count();
  await page.evaluate(() => document.getElementById("more").scrollIntoView());
  await page.waitForFunction((n) => document.querySelectorAll("#targets .card").length > n, first, { timeout: T });
  if (shot) await page.screenshot({ path: shot });
  await noHorizontalScroll(page, "many");
  console.log("ok");
}

async function operator([target, token]) {
  const page = await open();
  await signIn(page, token);
  const card = page.locator(cardSel(target));
  await card.waitFor({ timeout: T });
  await page.waitForFunction(() => document.body.dataset.operator === "yes", null, { timeout: T });
  await card.locator('button[data-action="force_open"]').click();
  // Nothing happens before the confirmation.
  await card.locator("button[data-confirm]").waitFor({ timeout: T });
  await page.waitForTimeout(300);
  if ((await card.getAttribute("data-state")) !== "closed") throw new Error("acted before confirmation");
  await card.locator("input.reason").fill("drill from the browser");
  await card.locator('button[data-confirm="force_open"]').click();
  await page.waitForFunction((t) => document.querySelector(t)?.dataset.state === "forced_open", cardSel(target), { timeout: T });
  await page.waitForFunction((t) => document.querySelector(t + " .cause")?.textContent.includes("drill from the browser"), cardSel(target), { timeout: T });
  console.log("forced");
}

async function viewer([target, token]) {
  // Unauthenticated: the page is the sign-in form, and a POST is refused.
  const anon = await open();
  await anon.goto(url);
  await anon.locator('input[name="token"]').waitFor({ timeout: T });
  const post = (t) => fetch("/api/targets/" + encodeURIComponent(t) + "/breaker", {
    method: "POST", headers: { "Content-Type": "application/json", "X-Backstop-Action": "1" },
    body: JSON.stringify({ mode: "force_open", reason: "not allowed" }),
  }).then((r) => r.status);
  const anonStatus = await anon.evaluate(post, target);
  // Signed in as a viewer: the page, read-only.
  const page = await open();
  await signIn(page, token);
  const card = page.locator(cardSel(target));
  await card.waitFor({ timeout: T });
  await page.waitForFunction(() => document.body.dataset.operator === "no", null, { timeout: T });
  const buttons = await page.locator(".actions button").count();
  if (buttons !== 0) throw new Error(`a viewer sees ${buttons} operator buttons`);
  const viewerStatus = await page.evaluate(post, target);
  console.log(`refused ${anonStatus} ${viewerStatus}`);
}

try {
  const scenarios = { history, many, operator, viewer };
  const run = scenarios[mode];
  if (!run) throw new Error(`unknown scenario ${mode}`);
  await run(rest);
} finally {
  await browser.close();
}
