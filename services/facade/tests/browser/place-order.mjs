// A customer orders on the web page and follows the order to Delivered.
//
// Run by tests/browser.rs with:
//   DISHPATCH_NODE     the directory playwright-core is installed in (hack/deps.sh)
//   FACADE_URL         the façade, e.g. http://127.0.0.1:8080
//   SCREENSHOT         where to write the screenshot of the delivered order
//   USER_DATA_DIR      a fresh, empty Chromium profile directory
//   CUSTOMER           the customer id to sign in as (dev login)
//   CHROMIUM           the browser binary (default /usr/bin/chromium)
import { createRequire } from 'node:module';
import path from 'node:path';

const env = (name) => {
  const v = process.env[name];
  if (!v) throw new Error(`${name} is not set`);
  return v;
};
const require = createRequire(path.join(env('DISHPATCH_NODE'), 'package.json'));
const { chromium } = require('playwright-core');

const base = env('FACADE_URL');
const screenshot = env('SCREENSHOT');
const customer = env('CUSTOMER');
const log = (...a) => console.log(new Date().toISOString(), ...a);

const context = await chromium.launchPersistentContext(env('USER_DATA_DIR'), {
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  headless: true,
  args: [
    '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync',
  ],
  viewport: { width: 1100, height: 900 },
});
const page = context.pages()[0] || await context.newPage();
page.setDefaultTimeout(20_000);
const problems = [];
page.on('console', (m) => { if (m.type() === 'error') problems.push(`console: ${m.text()}`); });
page.on('pageerror', (e) => problems.push(`page error: ${e.message}`));
page.on('response', (r) => { if (r.status() >= 400) problems.push(`HTTP ${r.status()} for ${r.request().method()} ${r.url()}`); });

let ok = false;
try {
  log('open', base + '/');
  await page.goto(base + '/');

  // Sign in through the dev login (the façade runs with --dev-login).
  await page.fill('#dev-sub', customer);
  await page.click('#dev-login');
  await page.locator('#who').filter({ hasText: `signed in as ${customer} (customer)` }).waitFor();
  log('signed in as', customer);

  // The restaurant list comes from the API; pick the first one and order two pizzas.
  await page.locator('#restaurant option').first().waitFor({ state: 'attached' });
  const restaurant = await page.inputValue('#restaurant');
  log('restaurant', restaurant);
  await page.getByLabel('quantity of Pizza').fill('2');
  await page.click('#place');

  // Tracking shows the order and follows it live until it is delivered.
  await page.locator('#tracking').waitFor({ state: 'visible' });
  const id = await page.textContent('#t-id');
  log('placed order', id);
  const phase = page.locator('#t-phase');
  let last = '';
  const deadline = Date.now() + 90_000;
  for (;;) {
    const now = (await phase.textContent()) || '';
    if (now !== last) { log('phase', now); last = now; }
    if (now === 'Delivered') break;
    if (['Rejected', 'Cancelled'].includes(now)) throw new Error(`order ended ${now}`);
    const err = (await page.textContent('#place-err')) + (await page.textContent('#t-err'));
    if (err.trim()) throw new Error(`the page shows an error: ${err.trim()}`);
    if (Date.now() > deadline) throw new Error(`order still ${now || '(none)'} after 90 s`);
    await page.waitForTimeout(200);
  }
  // The order list shows it too, and rating is offered.
  await page.locator('#rate-row').waitFor({ state: 'visible' });
  await page.click('#refresh');
  await page.locator('#orders li').filter({ hasText: `${id} — ${restaurant} — Delivered` }).waitFor();
  log('total', await page.textContent('#t-total'));
  ok = problems.length === 0;
  if (!ok) log('page problems:\n' + problems.join('\n'));
} catch (e) {
  log('FAILED:', e && e.stack ? e.stack : e);
  if (problems.length) log('page problems:\n' + problems.join('\n'));
  try { log('page text:\n' + await page.innerText('body')); } catch {}
} finally {
  try {
    await page.screenshot({ path: screenshot, fullPage: true });
    log('screenshot', screenshot);
  } catch (e) { log('no screenshot:', e.message); }
  await context.close();
}
process.exit(ok ? 0 : 1);
