// GET /docs: lists the operations of this proxy's own openapi.json and runs them ("Execute").
// Plain DOM, no framework, nothing fetched but this origin's. Text goes in with textContent
// only, never as HTML. Credentials typed in the form stay in this page's memory.
"use strict";

(function () {
  const pageDir = new URL(".", window.location.href); // /docs -> /, /sd/docs -> /sd/
  let spec = null;

  function el(tag, attributes, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attributes || {})) {
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = value;
      else if (value !== undefined && value !== null && value !== false) node.setAttribute(key, value);
    }
    for (const child of children) {
      if (child !== null && child !== undefined) node.append(child);
    }
    return node;
  }

  function resolve(schema, seen) {
    // Follows local $refs ("#/components/schemas/X"); a cycle ends at an empty schema.
    seen = seen || new Set();
    while (schema && typeof schema.$ref === "string") {
      if (seen.has(schema.$ref)) return {};
      seen.add(schema.$ref);
      let target = spec;
      for (const part of schema.$ref.replace(/^#\//, "").split("/")) {
        target = target ? target[part] : undefined;
      }
      schema = target;
    }
    return schema || {};
  }

  function example(schema, depth) {
    // A request body to start from: each property with a default, and the required ones.
    schema = resolve(schema);
    if (depth > 5) return null;
    if ("example" in schema) return schema.example;
    if ("default" in schema) return schema.default;
    switch (schema.type) {
      case "object": {
        const out = {};
        const required = schema.required || [];
        for (const [key, sub] of Object.entries(schema.properties || {})) {
          const resolved = resolve(sub);
          if ("default" in resolved || "example" in resolved || required.includes(key)) {
            out[key] = example(resolved, depth + 1);
          }
        }
        return out;
      }
      case "array":
        return schema.minItems ? [example(schema.items || {}, depth + 1)] : [];
      case "string":
        return "";
      case "integer":
      case "number":
        return 0;
      case "boolean":
        return false;
      default:
        return null;
    }
  }

  function expand(schema, depth) {
    // The schema with its $refs inlined (to show), a few levels deep.
    schema = resolve(schema);
    if (depth > 4 || typeof schema !== "object") return schema;
    const out = Array.isArray(schema) ? [] : {};
    for (const [key, value] of Object.entries(schema)) {
      out[key] = value && typeof value === "object" ? expand(value, depth + 1) : value;
    }
    return out;
  }

  function shorten(value) {
    // Base64 images are megabytes: show their start and length.
    if (typeof value === "string" && value.length > 300) {
      return value.slice(0, 100) + "\u2026 (" + value.length + " characters)";
    }
    if (Array.isArray(value)) return value.map(shorten);
    if (value && typeof value === "object") {
      const out = {};
      for (const [key, sub] of Object.entries(value)) out[key] = shorten(sub);
      return out;
    }
    return value;
  }

  function authorization() {
    const key = document.getElementById("auth-key").value.trim();
    if (key) return "Bearer " + key;
    const user = document.getElementById("auth-user").value;
    if (!user) return null;
    const password = document.getElementById("auth-password").value;
    const bytes = new TextEncoder().encode(user + ":" + password);
    return "Basic " + btoa(String.fromCharCode(...bytes));
  }

  function target(path, query) {
    const url = new URL(path.replace(/^\//, ""), pageDir);
    for (const [name, value] of query) url.searchParams.set(name, value);
    return url;
  }

  function curl(method, url, body) {
    const quote = (text) => "'" + String(text).replace(/'/g, "'\\''") + "'";
    let line = "curl -X " + method.toUpperCase() + " " + quote(url.href);
    if (authorization()) line += " -H 'Authorization: ...'";
    if (body !== null) line += " -H 'Content-Type: application/json' -d " + quote(body);
    return line;
  }

  async function execute(method, path, form, output) {
    output.replaceChildren(el("p", { text: "Sending\u2026" }));
    const query = [];
    for (const input of form.querySelectorAll("[data-query]")) {
      if (input.value !== "") query.push([input.dataset.query, input.value]);
    }
    const url = target(path, query);
    const headers = { Accept: "application/json" };
    const auth = authorization();
    if (auth) headers.Authorization = auth;
    const textarea = form.querySelector("textarea");
    let body = null;
    if (textarea) {
      body = textarea.value.trim() || null;
      if (body !== null) {
        try {
          JSON.parse(body);
        } catch (error) {
          output.replaceChildren(el("p", { class: "error", text: "The body is not JSON: " + error.message }));
          return;
        }
        headers["Content-Type"] = "application/json";
      }
    }
    const started = performance.now();
    let response;
    try {
      response = await fetch(url, { method: method.toUpperCase(), headers, body, credentials: "omit" });
    } catch (error) {
      output.replaceChildren(el("p", { class: "error", text: "Request failed: " + error.message }));
      return;
    }
    const text = await response.text();
    const took = Math.round(performance.now() - started);
    let shown = text;
    let info = null;
    try {
      const parsed = JSON.parse(text);
      shown = JSON.stringify(shorten(parsed), null, 2);
      if (parsed && typeof parsed.info === "string") {
        try {
          info = JSON.stringify(shorten(JSON.parse(parsed.info)), null, 2);
        } catch (error) {
          info = null; // info is not JSON: shown as the string it is
        }
      }
    } catch (error) {
      shown = text.length > 20000 ? text.slice(0, 20000) + "\u2026" : text; // not JSON
    }
    const headerLines = [];
    response.headers.forEach((value, name) => headerLines.push(name + ": " + value));
    output.replaceChildren(
      el("h3", { text: "Response" }),
      el(
        "p",
        {},
        el("span", {
          class: response.ok ? "status-ok" : "status-error",
          "data-status": String(response.status),
          text: response.status + " " + response.statusText,
        }),
        " in " + took + " ms",
      ),
      el("pre", { class: "response-body", text: shown }),
      info === null ? null : el("h3", { text: "info, decoded" }),
      info === null ? null : el("pre", { class: "response-info", text: info }),
      el("h3", { text: "Headers" }),
      el("pre", { class: "response-headers", text: headerLines.join("\n") }),
      el("h3", { text: "As curl" }),
      el("pre", { class: "curl", text: curl(method, url, body) }),
    );
  }

  function parameterRow(parameter) {
    const schema = resolve(parameter.schema);
    let input;
    if (schema.type === "boolean") {
      input = el("select", { "data-query": parameter.name, "aria-label": parameter.name },
        el("option", { value: "", text: "(not sent)" }),
        el("option", { value: "true", text: "true" }),
        el("option", { value: "false", text: "false" }));
    } else {
      input = el("input", { "data-query": parameter.name, "aria-label": parameter.name });
    }
    const about = [parameter.in, schema.type, "default" in schema ? "default " + JSON.stringify(schema.default) : null]
      .filter(Boolean).join(", ");
    return el("tr", {}, el("td", { class: "path", text: parameter.name + (parameter.required ? " *" : "") }),
      el("td", { text: about }), el("td", {}, input));
  }

  function operation(path, method, op) {
    const form = el("form", { class: "try", novalidate: "novalidate" });
    form.addEventListener("submit", (event) => event.preventDefault());
    const output = el("div", { class: "output", "aria-live": "polite" });
    const parts = [];
    if (op.description) parts.push(el("p", { text: op.description }));
    const parameters = (op.parameters || []).filter((p) => p.in === "query");
    if (parameters.length) {
      parts.push(el("h3", { text: "Parameters" }), el("table", {}, ...parameters.map(parameterRow)));
    }
    const content = op.requestBody && op.requestBody.content && op.requestBody.content["application/json"];
    if (content) {
      const start = JSON.stringify(example(content.schema || {}, 0), null, 2);
      parts.push(
        el("h3", { text: "Request body (JSON)" }),
        el("textarea", { "aria-label": "request body", spellcheck: "false", text: start }),
      );
      const schema = el("details", {}, el("summary", { text: "Schema" }),
        el("pre", { text: JSON.stringify(expand(content.schema || {}, 0), null, 2) }));
      parts.push(schema);
    }
    const responses = Object.entries(op.responses || {});
    if (responses.length) {
      parts.push(el("h3", { text: "Responses" }), el("table", {}, ...responses.map(([code, r]) =>
        el("tr", {}, el("td", { text: code }), el("td", { text: r.description || "" })))));
    }
    const button = el("button", { type: "button", class: "execute", text: "Execute" });
    button.addEventListener("click", () => execute(method, path, form, output));
    form.append(...parts, button);
    return el(
      "details",
      { class: "operation", "data-operation": method + " " + path, "data-search": (method + " " + path + " " + (op.summary || "")).toLowerCase() },
      el("summary", {}, el("span", { class: "method " + method, text: method }),
        el("span", { class: "path", text: path }), el("span", { class: "summary", text: summaryOf(op) })),
      el("div", { class: "body" }, form, output),
    );
  }

  const GROUPS = ["webui API (/sdapi/v1)", "Cluster (/cluster, /metrics)", "Internal (/internal)", "Other"];

  function group(path) {
    if (path.startsWith("/sdapi/")) return GROUPS[0];
    if (path.startsWith("/cluster") || path === "/metrics") return GROUPS[1];
    if (path.startsWith("/internal/")) return GROUPS[2];
    return GROUPS[3];
  }

  function summaryOf(op) {
    // Summaries are handler docstrings ("GET /sdapi/v1/x, from one node."): the method and
    // path are shown beside them already.
    return (op.summary || "").replace(/^[A-Z]+ \S+?[:,]?(\s+|$)/, "");
  }

  function render() {
    document.getElementById("title").textContent = (spec.info && spec.info.title) || "API";
    document.getElementById("version").textContent = spec.info && spec.info.version ? "v" + spec.info.version : "";
    if (spec.info && spec.info.description) {
      document.getElementById("description").textContent = spec.info.description;
    }
    const groups = new Map(GROUPS.map((name) => [name, []]));
    for (const [path, item] of Object.entries(spec.paths || {})) {
      for (const [method, op] of Object.entries(item)) {
        if (!["get", "post", "put", "patch", "delete"].includes(method)) continue;
        const name = group(path);
        if (!groups.has(name)) groups.set(name, []);
        groups.get(name).push(operation(path, method, op));
      }
    }
    const main = document.getElementById("operations");
    main.replaceChildren();
    for (const [name, operations] of groups) {
      if (!operations.length) continue;
      main.append(el("section", { class: "group" }, el("h2", { text: name }), ...operations));
    }
    document.body.dataset.operations = String(main.querySelectorAll("details.operation").length);
  }

  function filter() {
    const words = document.getElementById("filter").value.toLowerCase().split(/\s+/).filter(Boolean);
    for (const node of document.querySelectorAll("details.operation")) {
      node.hidden = !words.every((word) => node.dataset.search.includes(word));
    }
    for (const section of document.querySelectorAll("section.group")) {
      section.hidden = !section.querySelector("details.operation:not([hidden])");
    }
  }

  async function load() {
    const status = document.getElementById("status");
    try {
      const response = await fetch(new URL("openapi.json", pageDir), { credentials: "omit" });
      if (!response.ok) throw new Error("HTTP " + response.status);
      spec = await response.json();
      render();
      document.getElementById("filter").addEventListener("input", filter);
      document.body.dataset.loaded = "true";
    } catch (error) {
      status.textContent = "Could not load openapi.json: " + error.message;
      status.className = "error";
      document.body.dataset.loaded = "error";
    }
  }

  load();
})();
