// typage (npm age-encryption, by age's author): an independent age implementation with
// post-quantum (mlkem768x25519) keys, driven by tests/test_typage.py.
//   node typage.mjs decrypt IDENTITY_FILE IN OUT
//   node typage.mjs encrypt RECIPIENT IN OUT
// TYPAGE_DIR is where `npm install age-encryption` put node_modules (scripts/install.sh).
import { readFileSync, writeFileSync } from "node:fs"
import { join } from "node:path"
import { pathToFileURL } from "node:url"

const age = await import(
  pathToFileURL(join(process.env.TYPAGE_DIR, "node_modules/age-encryption/dist/index.js")).href
)
const [mode, key, input, output] = process.argv.slice(2)
const data = new Uint8Array(readFileSync(input))
if (mode === "decrypt") {
  const d = new age.Decrypter()
  for (const line of readFileSync(key, "ascii").split("\n")) {
    if (line.startsWith("AGE-SECRET-KEY-")) d.addIdentity(line.trim())
  }
  writeFileSync(output, await d.decrypt(data))
} else if (mode === "encrypt") {
  const e = new age.Encrypter()
  e.addRecipient(key)
  writeFileSync(output, await e.encrypt(data))
} else {
  throw new Error(`unknown mode ${mode}`)
}
