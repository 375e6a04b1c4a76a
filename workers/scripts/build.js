#!/usr/bin/env node
// Transpiles the cargo-built handler components with jco (JSPI mode) into gen/ and
// bundles the Worker into gen/worker.js. No handler logic is written here: the
// components are the same bytes `clawq serve` runs.
//
//   npm run build                       # the three bundled handlers
//   npm run build -- path/to/x.wasm     # and any component given (named after its file)
//   npm run build -- --with-test-guests # and the test handlers (trapping, scripted) for npm test
//
// The bundled handlers are read from ../target/guests/wasm32-wasip2/guest/ unless
// CLAWQ_GUEST_CRL_INVALIDATION, CLAWQ_GUEST_EVENT_ROUTER, CLAWQ_GUEST_RECEIPT_ROUTER
// (and CLAWQ_GUEST_FAILING_HANDLER, CLAWQ_GUEST_SCRIPTED_HANDLER) name the files, as the Rust end-to-end test does.

import { execFileSync } from "node:child_process";
import { mkdirSync, rmSync, writeFileSync, existsSync, readdirSync } from "node:fs";
import { basename, dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { build } from "esbuild";

const root = resolve(dirname(fileURLToPath(import.meta.url)), "..");
const gen = join(root, "gen");
const guestDir = resolve(root, "../target/guests/wasm32-wasip2/guest");
const jco = join(root, "node_modules/.bin/jco");

/**
 * The capability interfaces whose imports are served by Durable Objects, with every
 * function of each (WIT names). Every one of them must be named in `--async-imports`:
 * an async import jco does not know about is taken as an immediate `ok` (its Promise is
 * not awaited), so a failing Durable Object call would be acked.
 */
export const ASYNC_INTERFACES = {
  "trust-store": ["revoke-agent", "is-revoked"],
  "relay-sessions": ["deliver-receipt", "deliver-receipts", "deliver"],
  "actor-storage": ["get", "put", "delete", "list-prefix"],
};

/**
 * The component file of a handler: the env var the Rust build sets, else the cargo
 * output directory.
 * @param {string} name the handler's name, e.g. `crl-invalidation`
 * @returns {string}
 */
function guestPath(name) {
  const variable = "CLAWQ_GUEST_" + name.toUpperCase().replaceAll("-", "_");
  return process.env[variable] || join(guestDir, name.replaceAll("-", "_") + ".wasm");
}

/**
 * The `--async-imports` names for a component: every function of every async capability
 * interface it imports, at the version it imports.
 * @param {string} path the component file
 * @returns {{asyncImports: string[], handlerExport: string}}
 */
function asyncNames(path) {
  const wit = execFileSync(jco, ["wit", path], { encoding: "utf8" });
  const asyncImports = [];
  for (const [iface, functions] of Object.entries(ASYNC_INTERFACES)) {
    const match = wit.match(new RegExp(`import clawdentity:queues/${iface}@([0-9.]+);`));
    if (match) {
      for (const f of functions) {
        asyncImports.push(`clawdentity:queues/${iface}@${match[1]}#${f}`);
      }
    }
  }
  const exported = wit.match(/export clawdentity:queues\/handler@([0-9.]+);/);
  if (!exported) throw new Error(`${path} does not export clawdentity:queues/handler`);
  return { asyncImports, handlerExport: `clawdentity:queues/handler@${exported[1]}#handle` };
}

/**
 * Transpiles one component into gen/components/<name>/ and returns what the generated
 * index needs to load it.
 * @param {string} name the handler's name
 * @param {string} path its component file
 */
function transpile(name, path) {
  if (!existsSync(path)) throw new Error(`component ${name}: no file ${path} (run cargo build first)`);
  const out = join(gen, "components", name);
  const { asyncImports, handlerExport } = asyncNames(path);
  const args = ["transpile", path, "-o", out, "--name", "component", "--instantiation", "async",
    "-b", "0", "--async-mode", "jspi", "--quiet", "--async-exports", handlerExport];
  if (asyncImports.length) args.push("--async-imports", ...asyncImports);
  execFileSync(jco, args, { stdio: ["ignore", "ignore", "inherit"] });
  const cores = readdirSync(out).filter((f) => f.endsWith(".wasm")).sort();
  return { name, path, cores, asyncImports };
}

/**
 * jco's fallback loader (unused: the core modules are passed in) dynamically imports
 * `node:fs/promises`, which a Worker without `nodejs_compat` cannot resolve: it gets a
 * stub that throws if it is ever called.
 * @type {import("esbuild").Plugin}
 */
const noNodeFs = {
  name: "no-node-fs",
  setup(b) {
    b.onResolve({ filter: /^node:fs\/promises$/ }, () => ({ path: "node-fs-stub", namespace: "stub" }));
    b.onLoad({ filter: /.*/, namespace: "stub" }, () => ({
      contents: "export function readFile() { throw new Error('no file system in a Worker'); }\nexport default { readFile };",
    }));
  },
};

/** Builds gen/: the transpiled components, their index, and the bundled Worker. */
async function main() {
  const args = process.argv.slice(2);
  const handlers = ["crl-invalidation", "event-router", "receipt-router"].map((n) => [n, guestPath(n)]);
  if (args.includes("--with-test-guests")) {
    handlers.push(["failing-handler", guestPath("failing-handler")], ["scripted-handler", guestPath("scripted-handler")]);
  }
  for (const arg of args.filter((a) => !a.startsWith("--"))) {
    handlers.push([basename(arg, ".wasm").replaceAll("_", "-"), resolve(arg)]);
  }
  rmSync(gen, { recursive: true, force: true });
  mkdirSync(gen, { recursive: true });

  const started = performance.now();
  const built = handlers.map(([name, path]) => transpile(name, path));
  const transpileMs = performance.now() - started;

  let index = "// Generated by scripts/build.js: the transpiled handler components.\n";
  const entries = [];
  built.forEach((c, i) => {
    index += `import { instantiate as instantiate${i} } from "./components/${c.name}/component.js";\n`;
    const modules = c.cores.map((core, j) => {
      index += `import core${i}_${j} from "./components/${c.name}/${core}";\n`;
      return `${JSON.stringify(core)}: core${i}_${j}`;
    });
    entries.push(`  ${JSON.stringify(c.name)}: { instantiate: instantiate${i}, modules: { ${modules.join(", ")} } },`);
  });
  index += `\n/** Every handler component of this build, by name. */\nexport const components = {\n${entries.join("\n")}\n};\n`;
  writeFileSync(join(gen, "components.js"), index);

  const bundleStarted = performance.now();
  await build({
    entryPoints: [join(root, "src/index.js")],
    outfile: join(gen, "worker.js"),
    bundle: true,
    format: "esm",
    platform: "browser",
    target: "es2022",
    // The core modules are CompiledWasm modules of the Worker (workerd cannot compile
    // wasm from bytes at run time).
    external: ["*.wasm", "cloudflare:workers"],
    plugins: [noNodeFs],
    logLevel: "warning",
  });
  const figures = {
    components: built.map((c) => ({ name: c.name, path: c.path, asyncImports: c.asyncImports.length })),
    transpileMs: Math.round(transpileMs),
    bundleMs: Math.round(performance.now() - bundleStarted),
  };
  writeFileSync(join(gen, "build.json"), JSON.stringify(figures, null, 2));
  console.log(`built ${built.map((c) => c.name).join(", ")}: transpile ${figures.transpileMs} ms, bundle ${figures.bundleMs} ms`);
}

await main();
