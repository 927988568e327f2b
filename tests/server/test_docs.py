"""GET /docs: the interactive API page, served locally and used in a real headless Chromium."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import aiohttp

from sdproxy.fakewebui import FakeNodeSettings
from sdproxy.server.docs import CSP
from tests.server.browser import Page, chromium_page
from tests.support import fake_nodes, proxy

KEY = "docs-test-key-0123"
ASSETS = ("/docs", "/docs/docs.js", "/docs/docs.css")


async def fetch(session: aiohttp.ClientSession, url: str) -> tuple[int, dict[str, str], str]:
    async with session.get(url, allow_redirects=False) as resp:
        return resp.status, dict(resp.headers), await resp.text()


def operations(document: dict[str, Any]) -> list[str]:
    return sorted(
        f"{method} {path}"
        for path, item in document["paths"].items()
        for method in item
        if method in ("get", "post")
    )


async def execute(page: Page, operation: str, **fill: str) -> tuple[str, Any]:
    """Open ``operation``, fill its inputs (``body`` is the request body), press Execute."""
    selector = json.dumps(f'details[data-operation="{operation}"]')
    fields = json.dumps(fill)
    await page.evaluate(
        f"""(() => {{
          const op = document.querySelector({selector});
          op.open = true;
          const fill = {fields};
          for (const [name, value] of Object.entries(fill)) {{
            const input = name === "body" ? op.querySelector("textarea")
              : op.querySelector(`[data-query="${{name}}"]`);
            input.value = value;
          }}
          op.querySelector(".output").replaceChildren();
          op.querySelector("button.execute").click();
        }})()"""
    )
    status = await page.wait_for(
        f"document.querySelector({selector}).querySelector('[data-status]')?.dataset.status",
        f"{operation} answered in the page",
    )
    shown = await page.evaluate(
        f"document.querySelector({selector}).querySelector('.response-body').textContent"
    )
    return status, json.loads(shown)


class TestDocsRoutes:
    """/docs and its assets are served from the package, locked to this origin."""

    async def test_docs_assets_are_local_and_locked(self) -> None:
        """The page, script and style answer 200 with the strict CSP, open without credentials."""
        async with (
            fake_nodes(FakeNodeSettings(name="a")) as nodes,
            proxy(nodes, server={"api_keys": [KEY]}) as url,
            aiohttp.ClientSession() as session,
        ):
            for path in ASSETS:
                status, headers, text = await fetch(session, url + path)
                assert status == 200, path
                assert headers["Content-Security-Policy"] == CSP
                assert headers["X-Content-Type-Options"] == "nosniff"
                # Nothing from another origin: no scheme-relative or absolute URLs at all.
                assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text), path
                assert not re.search(r"https?://", text), path
                if path.endswith(".css"):
                    assert not re.search(r"\burl\(|@import", text)
            status, headers, _ = await fetch(session, f"{url}/docs/")
            assert (status, headers["Location"]) == (301, "../docs")
            status, _, _ = await fetch(session, f"{url}/docs/other.js")
            assert status == 404
        assert "'unsafe" not in CSP
        assert "default-src 'self'" in CSP


class TestDocsInBrowser:
    """What a person does: open /docs, find an operation, try it out."""

    async def test_docs_lists_operations_and_executes_them(self, tmp_path: Path) -> None:
        """Every operation is listed; Execute runs progress (401 without a key, 200 with one)
        and txt2img, with no CSP violation or script error."""
        async with (
            fake_nodes(FakeNodeSettings(name="a")) as nodes,
            proxy(nodes, server={"api_keys": [KEY]}) as url,
            aiohttp.ClientSession() as session,
        ):
            async with session.get(f"{url}/openapi.json") as resp:
                document = await resp.json()
            async with session.get(
                f"{url}/sdapi/v1/progress", headers={"Authorization": f"Bearer {KEY}"}
            ) as resp:
                idle = await resp.json()
            async with chromium_page(tmp_path / "profile") as page:
                await page.open(f"{url}/docs")
                loaded = await page.wait_for("document.body?.dataset.loaded", "the page to load")
                assert loaded == "true"
                listed = await page.evaluate(
                    "[...document.querySelectorAll('details.operation')]"
                    ".map((d) => d.dataset.operation)"
                )
                assert sorted(listed) == operations(document)
                assert "get /sdapi/v1/progress" in listed

                status, shown = await execute(page, "get /sdapi/v1/progress")
                assert status == "401"
                assert shown["detail"] == "Not authenticated"

                await page.evaluate(f"document.getElementById('auth-key').value = {KEY!r}")
                status, shown = await execute(
                    page, "get /sdapi/v1/progress", skip_current_image="true"
                )
                assert (status, shown) == ("200", idle)

                body = json.dumps({"prompt": "owl", "batch_size": 2, "width": 64, "height": 64})
                status, shown = await execute(page, "post /sdapi/v1/txt2img", body=body)
                assert status == "200"
                assert len(shown["images"]) == 2
                assert all("characters)" in image for image in shown["images"])  # shortened
                info = await page.evaluate(
                    "document.querySelector('details[data-operation=\"post /sdapi/v1/txt2img\"]')"
                    ".querySelector('.response-info').textContent"
                )
                assert len(json.loads(info)["all_seeds"]) == 2

                await page.evaluate(
                    "document.getElementById('filter').value = 'progress';"
                    "document.getElementById('filter').dispatchEvent(new Event('input'))"
                )
                visible = await page.evaluate(
                    "[...document.querySelectorAll('details.operation:not([hidden])')]"
                    ".map((d) => d.dataset.operation)"
                )
                assert visible == ["get /sdapi/v1/progress"]
                assert await page.evaluate("window.__violations") == []
                # The one failed load is the 401 asked for above.
                assert page.problems(ignore="status of 401") == []
        assert nodes[0].node.images_rendered == 2
