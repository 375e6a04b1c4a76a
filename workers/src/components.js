/**
 * The handler components of this build (transpiled by scripts/build.js into gen/),
 * instantiated once per isolate and consumer, with their capability imports.
 */

import { components } from "../gen/components.js";
import { capabilityImports } from "./capabilities.js";
import { environment, exit, stdin, stdout, stderr, terminalInput, terminalOutput, terminalStderr, terminalStdin, terminalStdout } from "@bytecodealliance/preview2-shim/cli";
import { error, poll, streams } from "@bytecodealliance/preview2-shim/io";
import { monotonicClock, wallClock } from "@bytecodealliance/preview2-shim/clocks";
import { random, insecure, insecureSeed } from "@bytecodealliance/preview2-shim/random";

/** The WASI imports a Rust wasm32-wasip2 component makes (no files, no sockets). */
const WASI = {
  "wasi:cli/environment": environment,
  "wasi:cli/exit": exit,
  "wasi:cli/stdin": stdin,
  "wasi:cli/stdout": stdout,
  "wasi:cli/stderr": stderr,
  "wasi:cli/terminal-input": terminalInput,
  "wasi:cli/terminal-output": terminalOutput,
  "wasi:cli/terminal-stderr": terminalStderr,
  "wasi:cli/terminal-stdin": terminalStdin,
  "wasi:cli/terminal-stdout": terminalStdout,
  "wasi:io/error": error,
  "wasi:io/poll": poll,
  "wasi:io/streams": streams,
  "wasi:clocks/monotonic-clock": monotonicClock,
  "wasi:clocks/wall-clock": wallClock,
  "wasi:random/random": random,
  "wasi:random/insecure": insecure,
  "wasi:random/insecure-seed": insecureSeed,
};

/** @type {Map<string, Promise<any>>} live instances, by consumer */
const instances = new Map();

/**
 * The names of the handler components this Worker was built with.
 * @returns {string[]}
 */
export function componentNames() {
  return Object.keys(components);
}

/**
 * The `handler` export of the instance that serves `consumer` with component `handler`,
 * instantiated on first use.
 * @param {any} env the Worker's bindings
 * @param {string} consumer the consumer (handler slot) name
 * @param {string} handler the component's name
 * @returns {Promise<{handle: (queue: string, messages: any[]) => Promise<any[]>}>}
 */
function handlerOf(env, consumer, handler) {
  let instance = instances.get(consumer);
  if (!instance) {
    const component = components[handler];
    if (!component) throw new Error(`no handler component \`${handler}\` in this build (it has ${componentNames().join(", ")})`);
    const imports = { ...WASI, ...capabilityImports(env, consumer) };
    instance = component.instantiate((name) => component.modules[name], imports);
    instances.set(consumer, instance);
  }
  return instance.then((root) => root.handler);
}

/**
 * Calls `handle` of consumer `consumer`'s component. An error result, a trap or a
 * failure to instantiate throws; the instance is then dropped (a trapped instance
 * cannot be called again) and the next batch gets a fresh one.
 * @param {any} env the Worker's bindings
 * @param {string} consumer the consumer name
 * @param {string} handler the component's name
 * @param {string} queue the queue the batch comes from
 * @param {any[]} messages WIT `message` records
 * @returns {Promise<any[]>} WIT `outcome`s, one per message (maybe fewer)
 */
export async function handle(env, consumer, handler, queue, messages) {
  try {
    const exported = await handlerOf(env, consumer, handler);
    return await exported.handle(queue, messages);
  } catch (err) {
    instances.delete(consumer);
    // A WIT `err(string)` comes as a ComponentError whose payload is the text.
    throw new Error(`handler ${consumer} failed: ${err?.payload ?? err?.message ?? err}`);
  }
}
