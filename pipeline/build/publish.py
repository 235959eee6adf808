"""Push a finished dataset folder to the Hub, only as the manifest describes it.

Everything is checked before the network is touched: a shard that no longer matches its manifest, a missing card or a
missing token fail locally with the problem named. The upload is restricted to the listed files (no stray temp files
or hand-copied Parquet), and old shards under `data/` on the Hub are deleted by the same upload, because the card's
`data/train-*` glob would otherwise pick up a previous build's shards alongside the new ones.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pipeline.build.card import PLOTS_DIR, README, STATS
from pipeline.build.shards import MANIFEST, check_dataset

NO_TOKEN = "no Hugging Face token: set HF_TOKEN or run `huggingface-cli login`"


def publish_files(dataset_dir: Path) -> list[str]:
    """Sorted paths relative to the folder; assumes `check_dataset` passed, so the manifest is readable."""
    dataset_dir = Path(dataset_dir)
    manifest = json.loads((dataset_dir / MANIFEST).read_text())
    files = {entry["file"] for entry in manifest["shards"]} | {README, MANIFEST, STATS}
    if manifest.get("test_problems"):  # every test problem, solved or not: what `distill eval` scores a build on
        files.add(manifest["test_problems"]["file"])
    files |= {p.relative_to(dataset_dir).as_posix() for p in (dataset_dir / PLOTS_DIR).glob("*.png")}
    return sorted(files)


def publish_problems(dataset_dir: Path) -> list[str]:
    dataset_dir = Path(dataset_dir)
    problems = check_dataset(dataset_dir)
    problems += [
        f"{name}: missing (render the card first)" for name in (README, STATS) if not (dataset_dir / name).is_file()
    ]
    return problems


def publish(
    dataset_dir: Path, repo_id: str, private: bool = True, dry_run: bool = False, token: str | None = None
) -> list[str]:
    dataset_dir = Path(dataset_dir)
    problems = publish_problems(dataset_dir)
    if problems:
        raise ValueError(f"refusing to publish {dataset_dir}:\n  " + "\n  ".join(problems))
    files = publish_files(dataset_dir)
    verb = "would upload" if dry_run else "uploading"
    print(f"{verb} {len(files)} files to {repo_id} ({'private' if private else 'public'} dataset):")
    for name in files:
        print(f"  {(dataset_dir / name).stat().st_size:>14,}  {name}")
    if dry_run:
        return files

    import huggingface_hub  # imported late so a dry run never loads (or configures) the network client

    token = token or os.environ.get("HF_TOKEN") or huggingface_hub.get_token()
    if not token:
        raise RuntimeError(NO_TOKEN)
    recipe_hash = json.loads((dataset_dir / MANIFEST).read_text()).get("recipe_hash", "")
    api = huggingface_hub.HfApi(token=token)
    api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
    api.upload_folder(
        repo_id=repo_id,
        repo_type="dataset",
        folder_path=dataset_dir,
        allow_patterns=files,
        delete_patterns=["data/*", f"{PLOTS_DIR}/*"],
        commit_message=f"distill: publish build {recipe_hash[:12]}",
    )
    return files
