"""Screenshots of each section of ``dagkube report`` (docs/images/report-<section>.png).

    .venv/bin/python tools/report_screenshots.py [--redis URL] [--out docs/images]

Renders the report of a Redis's history (the embedded one by default), then, per section, a
copy of the page showing only that section, in headless Chromium.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import tempfile
from pathlib import Path

from dagkube.report import SECTIONS, load_histories, render
from dagkube.runtime.embedded import EmbeddedRedis
from dagkube.store.connection import connect

ROOT = Path(__file__).resolve().parents[1]


async def _page(url: str) -> str:
    redis = await connect(url)
    try:
        return render(await load_histories(redis, workflow=None, since=None, limit=500))
    finally:
        await redis.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--redis", default=None)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images")
    args = parser.parse_args()
    if args.redis:
        page = asyncio.run(_page(args.redis))
    else:
        with EmbeddedRedis() as url:
            page = asyncio.run(_page(url))
    browser = shutil.which("chromium") or "chromium"
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        for key in SECTIONS:
            others = ",".join(f"section#{k}" for k in SECTIONS if k != key)
            style = f"<style>{others},h1,body>p{{display:none}}</style></head>"
            path = Path(folder, f"{key}.html")
            path.write_text(page.replace("</head>", style, 1), encoding="utf-8")
            shot = args.out / f"report-{key}.png"
            subprocess.run(
                [
                    browser,
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-background-networking",
                    "--virtual-time-budget=20000",
                    "--hide-scrollbars",
                    "--window-size=1200,1400",
                    f"--screenshot={shot}",
                    path.as_uri(),
                ],
                check=True,
                capture_output=True,
                timeout=120,
            )
            print(f"wrote {shot}")


if __name__ == "__main__":
    main()
