// A restaurant's staff confirm a new order on /restaurant while the
// customer watches it on /: the customer's page moves on once confirmed.
//
// Run by tests/browser.rs with DISHPATCH_NODE, FACADE_URL, SCREENSHOT,
// CUSTOMER, RESTAURANT and CHROMIUM (see place-order.mjs).
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
const restaurant = env('RESTAURANT');
const log = (...a) => console.log(new Date().toISOString(), ...a);

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  headless: true,
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});
const problems = [];
const watch = (page, who) => {
  page.setDefaultTimeout(20_000);
  page.on('console', (m) => { if (m.type() === 'error') problems.push(`${who} console: ${m.text()}`); });
  page.on('pageerror', (e) => problems.push(`${who} page error: ${e.message}`));
  page.on('response', (r) => { if (r.status() >= 400) problems.push(`${who} HTTP ${r.status()} for ${r.request().method()} ${r.url()}`); });
};
// Two people, two browser profiles.
const staff = await (await browser.newContext({ viewport: { width: 1000, height: 800 } })).newPage();
const shopper = await (await browser.newContext({ viewport: { width: 1000, height: 800 } })).newPage();
watch(staff, 'staff'); watch(shopper, 'customer');

let ok = false;
try {
  await staff.goto(base + '/restaurant');
  await staff.fill('#restaurant', restaurant);
  await staff.click('#dev-login');
  await staff.locator('#board').waitFor({ state: 'visible' });
  log('staff signed in for', restaurant);

  await shopper.goto(base + '/');
  await shopper.fill('#dev-sub', customer);
  await shopper.click('#dev-login');
  await shopper.locator('#who').filter({ hasText: `signed in as ${customer} (customer)` }).waitFor();
  await shopper.locator('#restaurant option').first().waitFor({ state: 'attached' });
  await shopper.getByLabel('quantity of Pizza').fill('1');
  await shopper.click('#place');
  await shopper.locator('#tracking').waitFor({ state: 'visible' });
  const id = await shopper.textContent('#t-id');
  log('customer placed', id);

  // The new order arrives on the staff's board, waiting for them.
  const card = staff.locator(`#waiting li[data-id="${id}"]`);
  await card.waitFor();
  log('staff see it waiting');
  const before = await shopper.textContent('#t-phase');
  if (!['Pending', 'Accepted'].includes(before)) throw new Error(`customer saw ${before} before the confirmation`);
  await card.locator('button.confirm').click();
  log('staff confirmed');
  await staff.locator(`#active li[data-id="${id}"]`).waitFor();

  // The customer's page moves on: paid, no longer waiting for the restaurant.
  const deadline = Date.now() + 30_000;
  for (;;) {
    const now = await shopper.textContent('#t-phase');
    if (now === 'Paid' || now === 'Preparing') { log('customer sees', now); break; }
    if (['Rejected', 'Cancelled'].includes(now)) throw new Error(`order ended ${now}`);
    if (Date.now() > deadline) throw new Error(`customer still sees ${now} 30 s after the confirmation`);
    await shopper.waitForTimeout(200);
  }
  ok = problems.length === 0;
  if (!ok) log('page problems:\n' + problems.join('\n'));
} catch (e) {
  log('FAILED:', e && e.stack ? e.stack : e);
  if (problems.length) log('page problems:\n' + problems.join('\n'));
  try { log('staff page:\n' + await staff.innerText('body')); } catch {}
  try { log('customer page:\n' + await shopper.innerText('body')); } catch {}
} finally {
  try { await staff.screenshot({ path: screenshot, fullPage: true }); log('screenshot', screenshot); }
  catch (e) { log('no screenshot:', e.message); }
  await browser.close();
}
process.exit(ok ? 0 : 1);
