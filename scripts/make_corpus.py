"""Build an offline English-prose corpus from Debian documentation packages.

Downloads HTML documentation packages (by default only the permissively licensed ones) with
``apt-get download`` (the only network access), unpacks them with
``dpkg-deb -x``, converts each HTML page to plain text with the stdlib
``html.parser`` (navigation, sidebars, headers, footers, search boxes and
scripts dropped; headings, paragraphs, list items and code blocks kept, long
code listings truncated), drops short/boilerplate lines, dedupes identical
paragraphs across the whole corpus and splits by document (sha256 of
"<seed>:<package>/<relative path>") into train (~98%) and heldout (~2%).

Outputs (documents separated by one blank line; no blank line inside one):
    <out>/train.txt  <out>/heldout.txt  <out>/PROVENANCE.json

Run:  python scripts/make_corpus.py --out data/corpus
"""
import argparse
import glob
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from html.parser import HTMLParser

from tqdm import tqdm

# Package -> (license, regex of the HTML pages used). Licenses were checked by
# hand against usr/share/doc/<pkg>/copyright; that file's sha256 and DEP-5
# "License:" names are recorded in PROVENANCE.json as well.
PACKAGES = {
    "python3.11-doc": ("PSF-2.0", r"^usr/share/doc/python3\.11/html/"),
    "python-django-doc": ("BSD-3-Clause", r"^usr/share/doc/python-django-doc/html/"),
    "python-sqlalchemy-doc": ("MIT (Expat)", r"^usr/share/doc/python-sqlalchemy-doc/html/"),
    "postgresql-doc-15": ("PostgreSQL", r"^usr/share/doc/postgresql-doc-15/html/"),
    # copyleft: not used unless asked for with --packages
    "git-doc": ("GPL-2.0", r"^usr/share/doc/git-doc/"),
    "debian-handbook": ("GPL-2.0+ or CC-BY-SA-3.0",
                        r"^usr/share/doc/debian-handbook/html/en-US/"),
}
PERMISSIVE = ("python3.11-doc", "python-django-doc", "python-sqlalchemy-doc",
              "postgresql-doc-15")
SKIP_TAGS = {"script", "style", "nav", "header", "footer", "form", "aside", "svg",
             "head", "title", "noscript", "button", "select", "iframe"}
SKIP_CLASSES = {  # Sphinx, Django, SQLAlchemy, DocBook and asciidoc chrome
    "related", "sphinxsidebar", "sphinxsidebarwrapper", "footer", "headerlink",
    "mobile-nav", "menu-wrapper", "inline-search", "search", "searchbox",
    "version_switcher_placeholder", "language_switcher_placeholder", "clearer",
    "toctree-wrapper", "nav", "docnav", "navheader", "navfooter", "toc",
    "breadcrumbs", "docs-navigation-links,", "genindex-jumpbox",
    "modindex-jumpbox", "linenos", "indexterm"}
SKIP_IDS = {"hd", "ft", "sidebar", "global-nav", "searchbox", "footer", "toc",
            "banner", "navigation", "breadcrumbs", "docs-top-navigation-container",
            "fixed-sidebar", "docs-sidebar", "docs-bottom-navigation",
            "docs-copyright", "narrow-index-nav", "footer-text", "doc-versions"}
SKIP_ROLES = {"navigation", "search", "banner", "contentinfo"}
HEADINGS = {"h1", "h2", "h3", "h4", "h5", "h6"}
BLOCK_TAGS = HEADINGS | {"p", "li", "dt", "dd", "pre", "div", "section", "tr", "td",
                         "th", "blockquote", "table", "ul", "ol", "dl", "article",
                         "main", "body", "caption", "figcaption", "br", "hr"}
VOID_TAGS = {"br", "hr", "img", "input", "meta", "link", "area", "base", "col",
             "embed", "source", "track", "wbr", "param"}
SKIP_FILES = re.compile(r"(^|/)(genindex[^/]*|py-modindex|modindex|search|ix\d+|"
                        r"_sources|_static|_images|_downloads|_modules|"
                        r"Common_Content)(\.html|/)")
BOILERPLATE = re.compile(
    r"^(navigation|(table of )?contents|previous topic|next topic|this page|"
    r"report a bug|show source|quick search|index|modules|next|prev(ious)?|home|"
    r"up|theme|copyright ?©.*|©.*|last updated.*|found a bug\?.*|"
    r"created using sphinx.*)$", re.I)
MAX_CODE_LINES = 30  # code "in moderation": longer listings are truncated


class TextExtractor(HTMLParser):
    """Collects (kind, text) blocks, kind in {heading, text, code}; drops
    skipped subtrees; keeps the line layout of <pre>; if the page marks a
    role="main" element, only the blocks inside it are returned."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack, self.skip, self.pre, self.buf, self.blocks = [], 0, 0, [], []
        self.main_depth = self.main_start = self.main_blocks = None

    def flush(self):
        text, self.buf = "".join(self.buf).replace("¶", ""), []
        if self.pre:
            lines = [ln.rstrip() for ln in text.split("\n") if ln.strip()]
            if lines:
                self.blocks.append(("code", "\n".join(lines[:MAX_CODE_LINES])))
        elif text.split():
            heading = bool(self.stack) and self.stack[-1][0] in HEADINGS
            self.blocks.append(("heading" if heading else "text", " ".join(text.split())))

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        skipping = (tag in SKIP_TAGS or a.get("id") in SKIP_IDS
                    or bool(set((a.get("class") or "").split()) & SKIP_CLASSES)
                    or a.get("role") in SKIP_ROLES)
        if tag in BLOCK_TAGS and not self.skip:
            self.flush()
        if tag in VOID_TAGS:
            return
        if a.get("role") == "main" and self.main_depth is None and not self.skip:
            self.main_depth, self.main_start = len(self.stack), len(self.blocks)
        self.stack.append((tag, skipping))
        self.skip += skipping
        self.pre += tag == "pre"

    def handle_endtag(self, tag):
        if tag in VOID_TAGS or all(t != tag for t, _ in self.stack):
            return
        while self.stack:  # pop up to the matching tag (tolerates unclosed tags)
            if not self.skip and self.stack[-1][0] in BLOCK_TAGS:
                self.flush()
            t, skipping = self.stack.pop()
            self.skip -= skipping
            self.pre -= t == "pre"
            if self.main_blocks is None and len(self.stack) == self.main_depth:
                self.flush()
                self.main_blocks = self.blocks[self.main_start:]
            if t == tag:
                break

    def handle_data(self, data):
        if not self.skip:
            self.buf.append(data)


def html_to_blocks(path):
    """Kept (kind, text) blocks of one page: drops short/boilerplate lines."""
    parser = TextExtractor()
    with open(path, encoding="utf-8", errors="replace") as f:
        parser.feed(f.read())
    parser.close()
    parser.flush()
    blocks = parser.blocks if parser.main_blocks is None else parser.main_blocks
    return [(kind, text) for kind, text in blocks if keep_block(kind, text)]


def keep_block(kind, text):
    if kind == "code":
        return len(text) >= 20
    if BOILERPLATE.match(text):
        return False
    return len(text) >= 3 if kind == "heading" else len(text) >= 12 and len(text.split()) >= 2


def fetch_package(name, workdir):
    """apt-get download + dpkg-deb -x; returns provenance dict and unpack root."""
    subprocess.run(["apt-get", "download", "-q", name], cwd=workdir, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deb, = glob.glob(os.path.join(workdir, f"{name}_*.deb"))
    root = os.path.join(workdir, name)
    subprocess.run(["dpkg-deb", "-x", deb, root], check=True)
    version = subprocess.run(["dpkg-deb", "-f", deb, "Version"], check=True,
                             capture_output=True, text=True).stdout.strip()
    with open(deb, "rb") as f:
        deb_sha = hashlib.sha256(f.read()).hexdigest()
    with open(os.path.join(root, "usr/share/doc", name, "copyright"), "rb") as f:
        raw = f.read()
    text = raw.decode("utf-8", "replace")
    fields = (sorted(set(re.findall(r"^License:[ \t]*(\S.*)$", text, re.M)))
              if text.startswith("Format:") else ["(not DEP-5; see the file)"])
    return {"name": name, "version": version, "license": PACKAGES[name][0],
            "deb": os.path.basename(deb), "deb_sha256": deb_sha,
            "copyright_sha256": hashlib.sha256(raw).hexdigest(),
            "copyright_license_fields": fields}, root


def list_pages(root, include):
    """Sorted relative paths of regular .html files (symlinks not followed)."""
    paths = (os.path.join(d, fn) for d, _, fns in os.walk(root) for fn in fns)
    return sorted(os.path.relpath(p, root) for p in paths
                  if p.endswith(".html") and not os.path.islink(p)
                  and re.search(include, os.path.relpath(p, root))
                  and not SKIP_FILES.search(os.path.relpath(p, root)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="data/corpus")
    ap.add_argument("--packages", nargs="+", default=list(PERMISSIVE), choices=list(PACKAGES))
    ap.add_argument("--heldout-pct", type=float, default=2.0)
    ap.add_argument("--seed", type=int, default=0, help="salt of the split hash")
    args = ap.parse_args()
    t0 = time.time()
    os.makedirs(args.out, exist_ok=True)
    docs, packages, seen = [], [], set()
    with tempfile.TemporaryDirectory() as tmp:
        os.chmod(tmp, 0o777)  # apt-get download drops privileges to user _apt
        for name in args.packages:
            info, root = fetch_package(name, tmp)
            pages = list_pages(root, PACKAGES[name][1])
            n_docs = n_bytes = n_code = n_dups = 0
            for rel in tqdm(pages, desc=name, unit="page", mininterval=1.0):
                kept = []
                for kind, text in html_to_blocks(os.path.join(root, rel)):
                    key = hashlib.sha1(text.encode()).digest()
                    n_dups += key in seen
                    if key not in seen:
                        seen.add(key)
                        kept.append(text)
                        n_code += len(text.encode()) + 1 if kind == "code" else 0
                doc = "\n".join(kept)
                if len(doc) >= 200:  # drop near-empty pages (tables of contents)
                    docs.append((f"{name}/{rel}", doc))
                    n_docs, n_bytes = n_docs + 1, n_bytes + len(doc.encode())
            packages.append({**info, "html_pages_read": len(pages), "documents": n_docs,
                             "text_bytes": n_bytes, "code_block_bytes": n_code,
                             "duplicate_paragraphs_dropped": n_dups})
    splits = {"train": [], "heldout": []}
    for key, doc in docs:
        h = int(hashlib.sha256(f"{args.seed}:{key}".encode()).hexdigest(), 16)
        splits["heldout" if h % 10000 < args.heldout_pct * 100 else "train"].append((key, doc))
    stats = {}
    for split, items in splits.items():
        text = "\n\n".join(doc for _, doc in items) + "\n"
        with open(os.path.join(args.out, f"{split}.txt"), "w", encoding="utf-8") as f:
            f.write(text)
        stats[split] = {"documents": len(items), "bytes": len(text.encode()),
                        "chars": len(text), "sha256": hashlib.sha256(text.encode()).hexdigest()}
        print(f"{split}: {len(items)} docs, {len(text.encode()) / 1e6:.2f} MB")
    stats["heldout"]["document_keys"] = [key for key, _ in splits["heldout"]]
    prov = {"command": " ".join(["python"] + sys.argv), "args": vars(args),
            "method": "apt-get download <pkg>; dpkg-deb -x; html.parser text extraction; "
                      "global exact-paragraph dedupe; document goes to heldout iff "
                      "int(sha256('<seed>:<pkg>/<relpath>'), 16) % 10000 < heldout_pct*100",
            "packages": packages, "splits": stats,
            "wall_seconds": round(time.time() - t0, 1)}
    with open(os.path.join(args.out, "PROVENANCE.json"), "w") as f:
        json.dump(prov, f, indent=2)
    print(f"done in {time.time() - t0:.1f}s -> {args.out}")


if __name__ == "__main__":
    main()
