"""Give a store converted before crc32c became the row checksum crc32c row checksums, in place.

    python scripts/rechecksum.py MODEL_DIR

Every row is read and checked against its old crc32 first (a damaged store is refused, not
re-blessed); then ``ffn/crc32.npy`` holds each row's crc32c and the manifest's
``layout.ffn.row_checksum`` says so: the store is checked as one converted now would be.
"""

import argparse
import json
import os
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from flashjax.store import bundles


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model_dir")
    model_dir = Path(p.parse_args().model_dir)
    manifest_path = model_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    old = bundles.load_checksums(model_dir)
    if old.kind == "crc32c":
        print(f"{model_dir}: already crc32c")
        return
    new = np.zeros(old.shape, np.uint32)
    for layer in tqdm(range(old.shape[0]), desc="rechecksum", unit="layer"):
        new[layer] = bundles.row_checksums(bundles.read_layer(model_dir, layer, old), "crc32c")
    target = model_dir / bundles.FFN_DIR / bundles.CHECKSUM_FILE
    np.save(target.with_suffix(".tmp.npy"), new)
    manifest["layout"]["ffn"]["row_checksum"] = "crc32c"
    tmp = manifest_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(target.with_suffix(".tmp.npy"), target)  # checksums first, then the manifest
    os.replace(tmp, manifest_path)
    print(f"{model_dir}: {new.size} rows now carry crc32c")


if __name__ == "__main__":
    main()
