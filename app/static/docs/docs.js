// Starts Swagger UI or ReDoc on the API pages. It is a served file, not an inline script, so
// that the pages' Content-Security-Policy can refuse inline scripts.
//
// The schema is fetched here rather than by the UI: when API keys are required, /openapi.json
// answers 401 without one, and the page then asks for the key instead of showing a fetch error.
// The key stays in this page's memory (never in storage): a reload asks again.
"use strict";

(function () {
  // The security scheme that app/api/docs.py adds to the schema when keys are required.
  const API_KEY_SCHEME = "APIKeyHeader";

  const body = document.body;
  const form = document.getElementById("api-key-form");
  const keyInput = document.getElementById("api-key");
  const keyMessage = document.getElementById("api-key-message");
  const notice = document.getElementById("docs-error");
  const target = document.getElementById("docs-ui");

  function askForKey(text) {
    keyMessage.textContent = text;
    form.hidden = false;
    keyInput.focus();
  }

  function showError(text) {
    notice.textContent = text;
    notice.hidden = false;
  }

  async function errorMessage(response) {
    try {
      return (await response.json()).error.message;
    } catch (e) {
      return response.statusText;
    }
  }

  function render(schema, key) {
    form.hidden = true;
    notice.hidden = true;
    if (body.dataset.ui === "redoc") {
      Redoc.init(schema, {}, target);
      return;
    }
    const ui = SwaggerUIBundle({
      spec: schema,
      domNode: target,
      deepLinking: true,
      presets: [SwaggerUIBundle.presets.apis],
      layout: "BaseLayout",
      // Open each schema in the Schemas section: the feature names and types are what readers come for.
      defaultModelsExpandDepth: 2,
      // No call to the public validator: the page talks to this service only.
      validatorUrl: null,
    });
    // "Try it out" sends the same key; the Authorize button shows it and can change it.
    if (key) {
      ui.preauthorizeApiKey(API_KEY_SCHEME, key);
    }
  }

  async function load(key) {
    const headers = key ? { "X-API-Key": key } : {};
    let response;
    try {
      response = await fetch(body.dataset.openapiUrl, { headers, cache: "no-store" });
    } catch (e) {
      showError(`The API description could not be fetched: ${e.message}`);
      return;
    }
    if (response.status === 401) {
      askForKey("The API description lists every model's features, so it needs the X-API-Key " +
                "you send with predictions. Paste it here; it is kept in this page only.");
      return;
    }
    if (response.status === 403) {
      askForKey(`That key was refused (${await errorMessage(response)}). Paste another one.`);
      return;
    }
    if (response.status === 429) {
      const wait = response.headers.get("Retry-After");
      askForKey(`Too many wrong keys from this address: try again in ${wait || "a few"} seconds.`);
      return;
    }
    if (!response.ok) {
      showError(`The API description answered ${response.status}: ${await errorMessage(response)}`);
      return;
    }
    render(await response.json(), key);
  }

  form.addEventListener("submit", function (event) {
    event.preventDefault();
    load(keyInput.value.trim());
  });
  load("");
})();
