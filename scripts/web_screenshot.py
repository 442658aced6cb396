"""docs/web_demo.png: the web demo with the trained Lyra-Nano model, answering a spoken question
about a held-out image in speech.

    python scripts/web_screenshot.py [--model outputs/nano/model] [--out docs/web_demo.png]

Runs `python -m lyra.serve.web` on a free 127.0.0.1 port, drives it in Debian's headless
chromium (lyra/serve/web_browser.py), and saves the page once the answer and its audio are in.
Needs `make demo` to have trained the model.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO / "outputs" / "nano" / "model"))
    parser.add_argument("--transcript", default=str(REPO / "outputs" / "nano" / "demo_transcript.json"),
                        help="the demo's transcript: its first spoken question is asked again")
    parser.add_argument("--out", default=str(REPO / "docs" / "web_demo.png"))
    args = parser.parse_args(argv)

    from lyra.serve.web_browser import ask, chromium, serve

    transcript = Path(args.transcript)
    if not (Path(args.model) / "config.json").is_file() or not transcript.is_file():
        print(f"error: {args.model} or {transcript} is missing; run `make demo` first", file=sys.stderr)
        return 2
    question = json.loads(transcript.read_text())["spoken_answers"][0]
    with tempfile.TemporaryDirectory() as tmp, serve(args.model, Path(tmp) / "web.log", "--max-new-tokens", "8") as url, \
            chromium() as browser:
        page = browser.new_page(viewport={"width": 1280, "height": 820})
        turn = ask(page, url, Path(question["image"]), Path(question["speech"]), want_audio=True)
        if turn.errors or turn.answer_audio_seconds is None:
            print(f"error: the page did not answer in speech: {turn}", file=sys.stderr)
            return 1
        page.screenshot(path=args.out, full_page=True)
    print(f"asked {question['question']!r} about {Path(question['image']).name}: the page answered "
          f"{turn.answer!r} with {turn.answer_audio_seconds:.2f} s of speech; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
