// Validates an AsyncAPI document with AsyncAPI's own parser.
// Usage: node validate.js ../../asyncapi.yaml
const fs = require('fs');
const { Parser } = require('@asyncapi/parser');

async function main() {
  const file = process.argv[2];
  if (!file) {
    console.error('usage: node validate.js FILE');
    process.exit(2);
  }
  const { document, diagnostics } = await new Parser().parse(fs.readFileSync(file, 'utf8'), { source: file });
  // severity: 0 error, 1 warning, 2 info, 3 hint
  for (const d of diagnostics) {
    const level = ['error', 'warning', 'info', 'hint'][d.severity] || d.severity;
    console.log(`${level}: ${d.message} at ${d.path.join('.')}`);
  }
  const errors = diagnostics.filter((d) => d.severity === 0);
  if (!document || errors.length > 0) {
    console.error(`${file}: INVALID (${errors.length} errors)`);
    process.exit(1);
  }
  console.log(`${file}: valid AsyncAPI ${document.version()}, ${document.operations().length} operations, ${document.messages().length} messages`);
}

main().catch((e) => { console.error(e); process.exit(1); });
