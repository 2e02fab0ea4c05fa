"""The try-it page in real headless Chromium: generate through the form, watch the item arrive in the feed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestServer
from playwright.async_api import async_playwright, expect

from image_service.app import create_app

from .conftest import make_settings

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


@pytest.fixture
async def server() -> Any:
    running = TestServer(create_app(make_settings()), host="127.0.0.1")
    await running.start_server()
    yield running
    await running.close()


@pytest.mark.timeout(90)
async def test_generate_through_the_form_and_see_it_in_the_feed(server: TestServer) -> None:
    """Typing a prompt and pressing Generate shows the image, and the public item arrives in the live feed."""
    ARTIFACTS.mkdir(exist_ok=True)
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page(viewport={"width": 1200, "height": 800})
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            await page.goto(str(server.make_url("/")))
            await expect(page.locator("#feed-state")).to_have_text("live", timeout=10_000)
            await expect(page.locator("#model option")).to_have_count(1)

            await page.fill("#prompt", "a lighthouse at dusk")
            await page.select_option("#model", "procedural")
            await page.select_option("#width", "768")
            await page.select_option("#height", "256")
            await page.click("#generate")

            await expect(page.locator("#status")).to_contain_text("done", timeout=20_000)
            size = await page.eval_on_selector("#result", "img => [img.naturalWidth, img.naturalHeight]")
            assert size == [768, 256]
            item = page.locator("#feed li").filter(has_text="a lighthouse at dusk")
            await expect(item).to_have_count(1, timeout=10_000)
            await expect(item).to_contain_text("768×256")
            await page.wait_for_function(
                "() => [...document.querySelectorAll('#feed img')].every(i => i.complete && i.naturalWidth > 0)")

            await page.fill("#prompt", "my private diary")
            await page.check("#private")
            await page.click("#generate")
            await expect(page.locator("#status")).to_contain_text("done", timeout=20_000)
            await page.wait_for_timeout(300)
            await expect(page.locator("#feed li")).to_have_count(1)
            await page.screenshot(path=str(ARTIFACTS / "page.png"), full_page=True)
            assert errors == []
        finally:
            await browser.close()
