"""``flashjax verify``: check that a model directory is complete and its contents intact.

The manifest is read first (a bad manifest stops there: nothing else can be checked against
it); then the files are checked against it and every problem found is reported at once: the
tokenizer it names, the row checksum file, each DRAM group (present, restorable, every tensor's
dtype and crc32) and each FFN array (present, the only ones, shape, dtype, every row's crc32).
"""

from __future__ import annotations

from pathlib import Path

from tqdm.auto import tqdm

from flashjax.store import bundles
from flashjax.store.load import check_dram_group, read_dram_group, warn_unchecked
from flashjax.store.manifest import DRAM_DIR, MANIFEST, Manifest, dram_groups

SHOWN = 50  # problems listed in the error at most


def verify(model_dir: str | Path, progress: bool = True) -> str:
    """Read every file of the model; raise ``StoreError`` listing every problem found, or
    return a one-line report."""
    model_dir = Path(model_dir)
    manifest = Manifest.read(model_dir, check_files=False)
    cfg = manifest.config
    problems = manifest.file_problems(model_dir)
    shape = (cfg.num_hidden_layers, cfg.ffn_dim)
    try:
        checksums = bundles.load_checksums(model_dir, shape)
    except bundles.StoreError as e:
        problems.append(str(e))
        checksums = None

    groups = dram_groups(cfg)
    dram = model_dir / DRAM_DIR
    found = {p.name for p in dram.iterdir() if p.is_dir()} if dram.is_dir() else set()
    unexpected = sorted(found - set(groups))
    if unexpected:
        problems.append(f"{dram}: unexpected group(s) {unexpected[:5]}; {model_dir / MANIFEST} "
                        f"implies {len(groups)} ('top' and layer_000..)")
    if manifest.dram_checksums is None:
        warn_unchecked(model_dir)
    for group in tqdm(groups, desc="verify DRAM", unit="group", disable=not progress):
        if not (dram / group).is_dir():
            problems.append(f"{dram / group}: missing DRAM group ({model_dir / MANIFEST} "
                            f"implies {len(groups)}: 'top' and one per layer)")
            continue
        try:
            tree = read_dram_group(model_dir, group, check=False)
        except bundles.StoreError as e:
            problems.append(str(e))
            continue
        problems += check_dram_group(model_dir, manifest, group, tree)
        del tree

    ffn = model_dir / bundles.FFN_DIR
    layers = [bundles.layer_key(i) for i in range(cfg.num_hidden_layers)]
    arrays = {p.name for p in ffn.glob("layer_*") if p.is_dir()} if ffn.is_dir() else set()
    missing, extra = [n for n in layers if n not in arrays], sorted(arrays - set(layers))
    if missing or extra:
        problems.append(f"{ffn}: {len(arrays)} bundle array(s), expected {len(layers)} "
                        f"(num_hidden_layers in {model_dir / MANIFEST})"
                        + (f"; missing {missing[:5]}" if missing else "")
                        + (f"; unexpected {extra[:5]}" if extra else ""))
    width = (cfg.ffn_dim, cfg.bundle_width if manifest.quant is None else manifest.row_bytes)
    row_dtype = manifest.dtype if manifest.quant is None else "uint8"
    if manifest.quant is not None:
        try:
            bundles.load_scales(model_dir, manifest)
        except bundles.StoreError as e:
            problems.append(str(e))
    if manifest.order is not None:  # a placed store: the rows' neuron order
        from flashjax.store.place import load_order

        try:
            load_order(model_dir, manifest)
        except bundles.StoreError as e:
            problems.append(str(e))
    for layer in tqdm(range(cfg.num_hidden_layers), desc="verify FFN", unit="layer",
                      disable=not progress):
        if layers[layer] in missing:
            continue
        where = ffn / layers[layer]
        try:
            store = bundles.open_layer(model_dir, layer)
        except bundles.StoreError as e:
            problems.append(str(e))
            continue
        wrong = []
        if tuple(store.shape) != width:
            wrong.append(f"shape {tuple(store.shape)}, expected {width} (ffn_dim, bundle width)")
        if store.dtype.name != row_dtype:
            wrong.append(f"dtype {store.dtype.name}, expected {row_dtype} (the manifest's "
                         f"{manifest.ffn_dtype} rows)")
        if wrong:
            problems.append(f"{where}: " + "; ".join(wrong))
            continue
        if not any(p.is_file() for p in (where / "c").rglob("*")):
            # TensorStore reads the rows of a missing shard as zeros
            problems.append(f"{where}: the shard file holding its rows is missing")
            continue
        try:
            bundles.read_layer(model_dir, layer, checksums)
        except bundles.StoreError as e:
            problems.append(str(e))

    if problems:
        shown = problems[:SHOWN] + ([f"and {len(problems) - SHOWN} more"]
                                    if len(problems) > SHOWN else [])
        raise bundles.StoreError(f"{model_dir}: {len(problems)} problem(s) found:\n  - "
                                 + "\n  - ".join(shown))
    dram_note = "DRAM crc32-checked" if manifest.dram_checksums is not None else \
        "DRAM part not checked (format version 1 manifest: reconvert to add its checksums)"
    return (f"{model_dir}: OK ({cfg.num_hidden_layers} layers x {cfg.ffn_dim} bundles, "
            f"{manifest.total_bytes / 1e6:.1f} MB, {manifest.dtype}"
            + (f", {manifest.ffn_dtype} FFN rows" if manifest.quant is not None else "")
            + f"; {dram_note})")
