"""`--miners camo+index,npr,baseline` -> one spec per miner process, checked before anything starts."""

from dataclasses import dataclass
from pathlib import Path

from base_miner.registry import ConfigError, load_config
from validator.localnet.errors import LocalnetError

INDEX_SUFFIX = "+index"  # a --miners entry CONFIG+index serves CAMO with a retrieval index of the real sample
MAX_MINERS = 16


@dataclass(frozen=True)
class MinerSpec:
    """One miner process of the run: its detector, its label on the board and its wallet."""

    index: int
    detector: str  # as given: a packaged config name or a YAML path
    label: str  # short name for the leaderboard
    wallet_name: str
    with_index: bool = False  # serve with --miner.index (the entry ended in INDEX_SUFFIX)


def parse_miners(text: str) -> list[MinerSpec]:
    """`camo+index,npr,baseline` -> miner specs; every entry must name a packaged detector config or a YAML file
    (a CAMO one when it ends in +index)."""
    entries = [part.strip() for part in text.split(",")]
    if not entries or any(not entry for entry in entries):
        raise LocalnetError(f"--miners must be a comma list of detector names, got {text!r}")
    if len(entries) > MAX_MINERS:
        raise LocalnetError(f"--miners lists {len(entries)} miners; at most {MAX_MINERS} run on one machine")
    specs = []
    for index, entry in enumerate(entries, start=1):
        with_index = entry.endswith(INDEX_SUFFIX)
        if with_index:
            entry = entry[: -len(INDEX_SUFFIX)]
        try:
            detector = load_config(entry).get("detector")
        except ConfigError as exc:
            raise LocalnetError(f"--miners entry {index} ({entry!r}): {exc}") from None
        if with_index and detector != "CAMO":
            raise LocalnetError(f"--miners entry {index}: {INDEX_SUFFIX} needs a CAMO config; {entry!r} is {detector}")
        path = Path(entry).expanduser()
        if path.exists():  # a YAML file: the miner runs in the work folder, so hand it an absolute path
            entry, label = str(path.resolve()), path.stem
        else:
            label = entry
        label += INDEX_SUFFIX if with_index else ""
        specs.append(MinerSpec(index, entry, label, f"localnet-miner{index}", with_index))
    return specs
