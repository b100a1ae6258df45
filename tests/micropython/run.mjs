// Runs a Python script under MicroPython's WebAssembly port (npm package
// @micropython/micropython-webassembly-pyscript), as the kit firmware would
// run the codec.  Usage: node run.mjs PACKAGE_DIR SCRIPT [SRC=DEST ...]
// Each SRC file is copied into MicroPython's filesystem at DEST first; the
// script's output (stdout and stderr) goes to stdout; exit status 1 if the
// script raised.
import { readFileSync } from "node:fs";
import { pathToFileURL } from "node:url";
import path from "node:path";

const [pkg, script, ...files] = process.argv.slice(2);
const { loadMicroPython } = await import(pathToFileURL(path.join(pkg, "micropython.mjs")).href);
let out = "";
const write = (s) => { out += s + "\n"; };
const mp = await loadMicroPython({ stdout: write, stderr: write });
for (const spec of files) {
  const [src, dest] = spec.split("=");
  mp.FS.writeFile(dest, readFileSync(src));
}
let status = 0;
try {
  mp.runPython("import sys\nsys.path.append('/')");
  mp.runPython(readFileSync(script, "utf8"));
} catch (err) {
  out += String(err) + "\n";
  status = 1;
}
process.stdout.write(out);
process.exit(status);
