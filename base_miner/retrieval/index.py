"""The retrieval index: a folder with a faiss index of descriptor vectors, their owners and a manifest.

    manifest.json   format, version, descriptor identity, search settings, datasets and row counts, calibration,
                    and the size and SHA-256 of every data file (written last: no manifest, no index)
    vectors.faiss   PCA-whitening (fitted on the index's own vectors; left out below `dim` entries, too few to
                    fit it) -> L2 norm -> inner-product search;
                    exact (flat) up to FLAT_MAX_ENTRIES entries, IVF with 8-bit scalar quantisation above
    owners.npy      int64, the indexed image each entry (view) belongs to
    keypoints.npy, descriptors.npy, counts.npy, sizes.npy
                    each indexed image's ORB keypoints for the geometric verification (`local.py`), zero-padded
                    to KEYPOINTS, and the (width, height) of the frame they were found in; memory-mapped, so only
                    the verified images' pages are read

Match score (the shortlist): the best image's similarity minus the mean similarity of the next BACKGROUND_IMAGES
images. A distorted copy of an indexed image stands far above its runners-up; a new image that merely shows similar
content (a generated dog among indexed dogs) is close to several images at once, so its margin stays small. Measured
on `diverse`, this margin separates copies from generated images far better than the raw similarity, and puts the
right image first for nearly every copy; the geometric verification then decides.
"""

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from base_miner.registry import ConfigError
from base_miner.retrieval.calibration import Calibration, CalibrationError
from base_miner.retrieval.local import KEYPOINTS, LocalFeatures
from bitmind.atomic import atomic_write_bytes

__all__ = ["INDEX_FORMAT", "INDEX_VERSION", "MANIFEST", "RetrievalIndex", "RetrievalIndexError", "read_manifest"]


INDEX_FORMAT = "bitmind-retrieval-index"
INDEX_VERSION = 4  # 2: a match rule per indexed dataset; 3: keypoint frame sizes, rules fitted on two-scale keypoints;
# 4: inlier counts that fall with the score (calibration steps)
MANIFEST = "manifest.json"
VECTORS = "vectors.faiss"
OWNERS = "owners.npy"
LOCAL_FILES = {"points": "keypoints.npy", "descriptors": "descriptors.npy", "counts": "counts.npy", "sizes": "sizes.npy"}
DATA_FILES = (VECTORS, OWNERS, *LOCAL_FILES.values())
SEARCH_K = 100  # nearest entries per query; at most 28+ are views of one image, so several images show up
BACKGROUND_IMAGES = 5
FLAT_MAX_ENTRIES = 100_000
TRAIN_SAMPLE = 200_000  # entries (evenly spaced) that fit the whitening and the IVF lists
WHITEN_POWER = -0.25  # eigenvalue power of the PCA transform: partial whitening measured best (-0.5 is full)
IVF_NPROBE = 32
_HASH_CHUNK = 1 << 22


class RetrievalIndexError(ConfigError):
    """An index folder is missing, incomplete, corrupt, or was built with another descriptor or format."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _search_settings(entries: int) -> dict[str, Any]:
    if entries <= FLAT_MAX_ENTRIES:
        return {"kind": "flat"}
    lists = int(min(65536, max(256, 2 * math.sqrt(entries))))
    return {"kind": "ivf-sq8", "nlist": lists, "nprobe": IVF_NPROBE}


def _new_faiss_index(dim: int, settings: dict[str, Any]) -> faiss.Index:
    if settings["kind"] == "flat":
        core: faiss.Index = faiss.IndexFlatIP(dim)
    else:
        quantizer = faiss.IndexFlatIP(dim)
        core = faiss.IndexIVFScalarQuantizer(
            quantizer, dim, settings["nlist"], faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT
        )
        core.own_fields = True
        quantizer.this.disown()
    index = faiss.IndexPreTransform(core)
    index.prepend_transform(faiss.NormalizationTransform(dim, 2.0))
    if settings["whitened"]:
        index.prepend_transform(faiss.PCAMatrix(dim, dim, WHITEN_POWER))
    return index


def _apply_settings(index: faiss.Index, settings: dict[str, Any]) -> None:
    if settings["kind"] != "flat":
        faiss.extract_index_ivf(index).nprobe = int(settings["nprobe"])


def read_manifest(folder: str | Path, descriptor: dict[str, Any], verify_files: bool = True) -> dict[str, Any]:
    """The manifest of a complete index built with `descriptor`; RetrievalIndexError says what is wrong and what to do.

    `verify_files` also checks every data file's size and SHA-256 (reads them once: about a second per 300 MB).
    """
    folder = Path(folder).expanduser()
    path = folder / MANIFEST
    if not folder.is_dir():
        raise RetrievalIndexError(f"retrieval index {str(folder)!r} does not exist (build one with `bitmind-index build`)")
    if not path.is_file():
        hint = " (an unfinished build: run the same `bitmind-index build` again to resume)" if (folder / "build").is_dir() else ""
        raise RetrievalIndexError(f"retrieval index {str(folder)!r} has no {MANIFEST}{hint}")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RetrievalIndexError(f"retrieval index manifest {str(path)!r} is unreadable: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != INDEX_FORMAT:
        raise RetrievalIndexError(f"{str(path)!r} is not a {INDEX_FORMAT} manifest")
    if manifest.get("version") != INDEX_VERSION:
        raise RetrievalIndexError(
            f"retrieval index {str(folder)!r} has format version {manifest.get('version')!r}; this code reads "
            f"version {INDEX_VERSION}: rebuild it with `bitmind-index build`"
        )
    if manifest.get("descriptor") != descriptor:
        raise RetrievalIndexError(
            f"retrieval index {str(folder)!r} was built with descriptor {manifest.get('descriptor')!r}, but this "
            f"miner computes {descriptor!r}: rebuild the index with this version"
        )
    try:
        Calibration.from_dict(manifest.get("calibration"))
    except CalibrationError as exc:
        raise RetrievalIndexError(f"retrieval index {str(folder)!r}: {exc}") from None
    files = manifest.get("files")
    if not isinstance(files, dict) or set(files) != set(DATA_FILES):
        raise RetrievalIndexError(f"retrieval index {str(folder)!r}: manifest must list the files {list(DATA_FILES)}")
    for name, expected in files.items():
        file = folder / name
        if not file.is_file():
            raise RetrievalIndexError(f"retrieval index {str(folder)!r} lacks {name}")
        if not isinstance(expected, dict) or file.stat().st_size != expected.get("bytes"):
            raise RetrievalIndexError(f"retrieval index file {str(file)!r} has the wrong size: corrupt or replaced")
        if verify_files and _sha256(file) != expected.get("sha256"):
            raise RetrievalIndexError(f"retrieval index file {str(file)!r} fails its SHA-256 check: corrupt or replaced")
    return manifest


class RetrievalIndex:
    """Vectors of indexed views, searchable by match score, and each indexed image's keypoints (module docstring)."""

    def __init__(self, search: faiss.Index, owners: np.ndarray, local: dict[str, np.ndarray],
                 settings: dict[str, Any]) -> None:  # fmt: skip
        images = int(owners.max()) + 1 if len(owners) else 0
        shapes = {name: array.shape for name, array in local.items()}
        if search.ntotal != len(owners) or shapes != {
            "points": (images, KEYPOINTS, 2), "descriptors": (images, KEYPOINTS, 32), "counts": (images,),
            "sizes": (images, 2),
        }:
            raise RetrievalIndexError(f"index holds {search.ntotal} vectors, {len(owners)} owners, keypoints {shapes}")
        self.search_index = search
        self.owners = owners
        self.local = local
        self.settings = settings
        _apply_settings(search, settings)

    @property
    def entries(self) -> int:
        return int(self.search_index.ntotal)

    @property
    def images(self) -> int:
        return len(self.local["counts"])

    def reference(self, image: int) -> LocalFeatures:
        """The keypoints of indexed image number `image`."""
        count = int(self.local["counts"][image])
        return np.asarray(self.local["points"][image, :count]), np.asarray(self.local["descriptors"][image, :count])

    def frame(self, image: int) -> tuple[int, int]:
        """(width, height) of the frame indexed image number `image`'s keypoints were found in."""
        width, height = (int(v) for v in self.local["sizes"][image])
        return width, height

    @classmethod
    def create(cls, vectors: np.ndarray, owners: np.ndarray, local: dict[str, np.ndarray]) -> "RetrievalIndex":
        """Fit the whitening (and IVF lists) on an evenly spaced sample of `vectors`, then add them all."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        owners = np.asarray(owners, dtype=np.int64)
        if vectors.ndim != 2 or len(vectors) != len(owners) or len(vectors) == 0:
            raise ValueError(f"need a non-empty (n, dim) array with one owner per row, got {vectors.shape}, {owners.shape}")
        step = max(1, len(vectors) // TRAIN_SAMPLE)
        # A tiny index (a few images) has fewer vectors than dimensions: PCA cannot be fitted on it.
        settings = _search_settings(len(vectors)) | {"whitened": len(vectors[::step]) >= vectors.shape[1]}
        index = _new_faiss_index(vectors.shape[1], settings)
        index.train(vectors[::step])
        index.add(vectors)
        return cls(index, owners, local, settings)

    def scores(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(match score, best image) per query vector."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        k = min(SEARCH_K, self.entries)
        similarities, hits = self.search_index.search(queries, k)
        scores = np.empty(len(queries), dtype=np.float64)
        best = np.full(len(queries), -1, dtype=np.int64)
        for row, (sims, ids) in enumerate(zip(similarities, hits)):
            valid = ids >= 0
            sims, owners = sims[valid], self.owners[ids[valid]]
            if not len(sims):
                scores[row] = -math.inf
                continue
            _, first = np.unique(owners, return_index=True)
            order = np.sort(first)[: BACKGROUND_IMAGES + 1]  # each image's best hit, best image first
            per_image = sims[order]
            # Images that did not make the top k score at most the last hit: a cautious stand-in for them.
            background = np.pad(per_image[1:], (0, BACKGROUND_IMAGES + 1 - len(per_image)), constant_values=sims[-1])
            scores[row] = float(per_image[0] - background.mean())
            best[row] = int(owners[order[0]])
        return scores, best

    def save(self, folder: str | Path, descriptor: dict[str, Any], datasets: list[dict[str, Any]],
             calibration: Calibration) -> dict[str, Any]:  # fmt: skip
        """Write the data files, then the manifest (atomically, last), into `folder`; returns the manifest."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(folder / VECTORS, faiss.serialize_index(self.search_index).tobytes())
        atomic_write_bytes(folder / OWNERS, lambda handle: np.save(handle, self.owners, allow_pickle=False))
        for name, file in LOCAL_FILES.items():
            atomic_write_bytes(folder / file, lambda handle, name=name: np.save(handle, self.local[name], allow_pickle=False))
        manifest = {
            "format": INDEX_FORMAT,
            "version": INDEX_VERSION,
            "descriptor": descriptor,
            "search": self.settings,
            "images": self.images,
            "entries": self.entries,
            "datasets": datasets,
            "calibration": calibration.to_dict(),
            "files": {
                name: {"bytes": (folder / name).stat().st_size, "sha256": _sha256(folder / name)} for name in DATA_FILES
            },
        }
        atomic_write_bytes(folder / MANIFEST, json.dumps(manifest, indent=2).encode())
        return manifest

    @classmethod
    def load(cls, folder: str | Path, descriptor: dict[str, Any]) -> tuple["RetrievalIndex", dict[str, Any]]:
        """(index, manifest) of a complete, intact index built with `descriptor`; RetrievalIndexError otherwise."""
        folder = Path(folder).expanduser()
        manifest = read_manifest(folder, descriptor)
        try:
            search = faiss.deserialize_index(np.fromfile(folder / VECTORS, dtype=np.uint8))
            owners = np.load(folder / OWNERS, allow_pickle=False)
            local = {name: np.load(folder / file, mmap_mode="r", allow_pickle=False) for name, file in LOCAL_FILES.items()}
        except (RuntimeError, OSError, ValueError) as exc:
            raise RetrievalIndexError(f"retrieval index {str(folder)!r} cannot be read: {exc}") from None
        if search.d != descriptor["dim"] or search.ntotal != manifest.get("entries") or owners.ndim != 1:
            raise RetrievalIndexError(f"retrieval index {str(folder)!r}: vectors do not match the manifest")
        settings = manifest.get("search")
        kind = settings.get("kind") if isinstance(settings, dict) else None
        nprobe = settings.get("nprobe") if isinstance(settings, dict) else None
        if kind != _search_settings(search.ntotal)["kind"] or (
            kind != "flat" and (isinstance(nprobe, bool) or not isinstance(nprobe, int) or nprobe < 1)
        ):
            raise RetrievalIndexError(f"retrieval index {str(folder)!r}: search settings {settings!r} do not fit its vectors")
        return cls(search, owners.astype(np.int64, copy=False), local, settings), manifest
