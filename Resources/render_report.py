"""Look at an HTML report as a person would: render it with a headless Chromium and check the picture.

    python Resources/render_report.py results/demo/report.html                  # -> results/demo/report.png
    python Resources/render_report.py results/demo/report.html --height 9000    # the whole page
    python Resources/render_report.py results/demo/report.html \\
        --thumbnail docs/images/report.png --crop 0 2300 --thumbnail-width 900  # the README picture

Needs Debian's Chromium (``apt-get install chromium``). Prints the measures of
``FreehandUSApp.report.check_png_not_blank`` (size, grey-level spread, colours, area with content)
as JSON; exits 0 when the picture has content, 1 when it looks blank or broken, 2 when it cannot
be rendered.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def make_thumbnail(png: Path, out: Path, *, crop=None, width: int = 900, colours: int = 256) -> Path:
    """Crop rows ``crop = (top, bottom)`` of ``png``, scale to ``width`` pixels, save a palette PNG."""
    from PIL import Image

    with Image.open(png) as img:
        img = img.convert("RGB")
        if crop is not None:
            top, bottom = crop
            img = img.crop((0, int(top), img.width, min(int(bottom), img.height)))
        if img.width > width:
            img = img.resize((width, round(img.height * width / img.width)), Image.LANCZOS)
        img = img.quantize(colors=colours, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
        out.parent.mkdir(parents=True, exist_ok=True)
        img.save(out, optimize=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("html", help="the report (.html)")
    p.add_argument("--out", help="screenshot PNG (default: next to the report, .png)")
    p.add_argument("--width", type=int, default=1400, help="window width in pixels (default 1400)")
    p.add_argument("--height", type=int, default=4000, help="window height in pixels (default 4000)")
    p.add_argument("--chromium", help="browser executable (default: chromium on the PATH or /usr/bin/chromium)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds before the browser is killed (default 120)")
    p.add_argument("--thumbnail", help="also write a small PNG (e.g. docs/images/report.png)")
    p.add_argument("--crop", type=int, nargs=2, metavar=("TOP", "BOTTOM"), help="rows of the screenshot to keep")
    p.add_argument("--thumbnail-width", type=int, default=900, help="width of the thumbnail (default 900)")
    args = p.parse_args(argv)

    from FreehandUSLib.errors import FreehandUSError
    from FreehandUSApp.report import check_png_not_blank, render_report_png

    html = Path(args.html)
    out = Path(args.out) if args.out else html.with_suffix(".png")
    try:
        png = render_report_png(html, out, chromium=args.chromium, window=(args.width, args.height),
                                timeout_s=args.timeout)
    except FreehandUSError as exc:
        print(f"render_report: error: {exc}", file=sys.stderr)
        return 2
    check = check_png_not_blank(png)
    check["png"] = str(png)
    if args.thumbnail:
        thumb = make_thumbnail(png, Path(args.thumbnail), crop=args.crop, width=args.thumbnail_width)
        check["thumbnail"] = str(thumb)
        check["thumbnail_bytes"] = thumb.stat().st_size
    print(json.dumps(check, indent=2))
    return 0 if check["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
