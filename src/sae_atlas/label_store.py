"""People's verdicts on latents and explanations, kept in the output directory (``labels.sqlite``).

The study's only ground truth is a person's judgement, so it is stored where nothing else
reaches it: an embedded SQLite database in WAL mode, created on first write, never touched by
``sae-atlas run`` (``run --force`` rewrites the pipeline's files, not this one). Every write is
one transaction, committed before it is acknowledged (``synchronous=FULL``): a label a client was
told is stored survives a kill -9 of the writer. Writers wait for each other (``busy_timeout``),
so several browsers and the command line can label at once.

History is append-only (triggers refuse UPDATE and DELETE): a label is a row; taking one back is
another row (``action = 'retract'``) naming it. The current label of a (latent, explainer) is the
newest label row not retracted. Each row has a ``label_id`` that never changes, so an export
imported into another output directory merges by it, and importing twice changes nothing.

A label records the hash of the explanation text it judged (``text_hash``): when the text has
changed since, the label is shown as stale, never silently carried over to the new text.
"""

from __future__ import annotations

import hashlib
import sqlite3
import threading
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Literal

import orjson
import polars as pl
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from sae_atlas import layout

VERDICTS = ("good", "partial", "bad", "unsure")
# The diagnosis causes, and the verdicts on a latent itself a person can give; a study adds its own
# in the config (``[labels] causes``).
CAUSES = (
    "misses the token pattern",
    "describes the top activations only",
    "too broad",
    "no coherent pattern",
    "feature split",
    "polysemantic",
    "dead or noise",
)
MAX_NOTE = 2000
MAX_CAUSES = 10
SCHEMA_VERSION = 1
COLUMNS = {
    "row": pl.Int64,
    "label_id": pl.String,
    "action": pl.String,
    "retracts": pl.String,
    "sae_id": pl.String,
    "feature_id": pl.Int64,
    "explainer": pl.String,
    "text_hash": pl.String,
    "verdict": pl.String,
    "causes": pl.List(pl.String),
    "note": pl.String,
    "author": pl.String,
    "created_at": pl.String,
    "origin": pl.String,
}
SCHEMA = """
CREATE TABLE IF NOT EXISTS labels (
    row INTEGER PRIMARY KEY AUTOINCREMENT,
    label_id TEXT NOT NULL UNIQUE,
    action TEXT NOT NULL CHECK (action IN ('label', 'retract')),
    retracts TEXT,
    sae_id TEXT NOT NULL,
    feature_id INTEGER NOT NULL CHECK (feature_id >= 0),
    explainer TEXT NOT NULL DEFAULT '',
    text_hash TEXT,
    verdict TEXT CHECK (verdict IS NULL OR verdict IN ('good', 'partial', 'bad', 'unsure')),
    causes TEXT NOT NULL DEFAULT '[]',
    note TEXT NOT NULL DEFAULT '',
    author TEXT NOT NULL,
    created_at TEXT NOT NULL,
    origin TEXT NOT NULL DEFAULT 'api'
);
CREATE INDEX IF NOT EXISTS labels_key ON labels (sae_id, feature_id, explainer);
CREATE TRIGGER IF NOT EXISTS labels_never_updated BEFORE UPDATE ON labels
BEGIN SELECT RAISE(ABORT, 'labels are append-only'); END;
CREATE TRIGGER IF NOT EXISTS labels_never_deleted BEFORE DELETE ON labels
BEGIN SELECT RAISE(ABORT, 'labels are append-only'); END;
"""

Text = Annotated[str, StringConstraints(strip_whitespace=True, max_length=200)]
Author = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1, max_length=64, pattern=r"^[^\x00-\x1f\x7f]+$")
]


class LabelError(ValueError):
    """A label that cannot be stored as given; the message is one line."""


class LabelIn(BaseModel):
    """One label as a client sends it."""

    model_config = ConfigDict(extra="forbid")

    feature_id: Annotated[int, Field(ge=0, lt=2**32)]
    explainer: Text | None = Field(None, description="the explainer whose explanation is judged; none: the latent")
    verdict: Literal["good", "partial", "bad", "unsure"]
    causes: Annotated[list[Text], Field(max_length=MAX_CAUSES)] = []
    note: Annotated[str, StringConstraints(max_length=MAX_NOTE)] = ""
    author: Author | None = None
    origin: Annotated[str, StringConstraints(pattern=r"^[a-z_]{1,20}(:[a-z_]{1,40})?$")] = Field(
        "api", description="where it was given: triage:<order>, feature, cli, api (only triage:random is unbiased)"
    )


def text_hash(text: str | None) -> str | None:
    """The hash a label keeps of the explanation text it judged."""
    return hashlib.blake2b(text.encode(), digest_size=12).hexdigest() if text is not None else None


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LabelStore:
    """The labels of one output directory. Opened read-only, it never creates the database and
    refuses writes (``validate``, ``sql`` and every read path open it so)."""

    def __init__(self, output_dir: Path, *, read_only: bool = False, causes: Iterable[str] = ()):
        self.path = Path(output_dir) / layout.LABELS
        self.read_only = read_only
        self.causes = tuple(dict.fromkeys((*CAUSES, *causes)))
        # One connection for this store's writes, kept open: opening and closing one per write cost
        # more than the write (the last connection to close checkpoints the WAL). Writes take turns
        # on it; other processes' writers wait on SQLite's lock as before.
        self._writer: sqlite3.Connection | None = None
        self._writer_lock = threading.Lock()

    def _connect(self, *, shared: bool = False) -> sqlite3.Connection:
        """A new connection; ``shared``: usable from any thread (the caller takes turns)."""
        if self.read_only:
            connection = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=10)
        else:
            connection = sqlite3.connect(self.path, timeout=10, isolation_level=None, check_same_thread=not shared)
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=FULL")
            connection.executescript(SCHEMA)
        connection.execute("PRAGMA busy_timeout=10000")
        return connection

    @contextmanager
    def _writing(self) -> Iterator[sqlite3.Connection]:
        """This store's write connection, for one thread at a time."""
        with self._writer_lock:
            if self._writer is None:
                self._writer = self._connect(shared=True)
            try:
                yield self._writer
            except BaseException:
                if self._writer.in_transaction:  # never leave a half transaction on the kept connection
                    self._writer.execute("ROLLBACK")
                raise

    def exists(self) -> bool:
        return self.path.exists()

    # -- writing ----------------------------------------------------------------------------------

    def add(self, labels: list[LabelIn], *, sae_id: str, texts: dict, default_author: str) -> list[str]:
        """Store ``labels`` in one transaction; their ids. ``texts`` maps (feature_id, explainer)
        to the explanation text judged (its hash is kept); a label of an explainer with no text
        for that latent is refused."""
        if self.read_only:
            raise LabelError("the label store is open read-only")
        rows = []
        for label in labels:
            unknown = sorted(set(label.causes) - set(self.causes))
            if unknown:
                raise LabelError(f"unknown cause {unknown[0]!r}; causes are: {', '.join(self.causes)}")
            if label.explainer is not None and (label.feature_id, label.explainer) not in texts:
                raise LabelError(f"feature {label.feature_id} has no explanation by {label.explainer!r}")
            rows.append(
                (
                    uuid.uuid4().hex,
                    "label",
                    None,
                    sae_id,
                    label.feature_id,
                    label.explainer or "",
                    text_hash(texts.get((label.feature_id, label.explainer))) if label.explainer else None,
                    label.verdict,
                    orjson.dumps(label.causes).decode(),
                    label.note,
                    label.author or default_author,
                    now(),
                    label.origin,
                )
            )
        self._insert(rows)
        return [row[0] for row in rows]

    def retract_last(self, *, sae_id: str, feature_id: int, explainer: str | None, author: str) -> str | None:
        """Take back ``author``'s newest label of (latent, explainer) that is not taken back yet;
        the id of the label taken back, None when there is none."""
        if self.read_only:
            raise LabelError("the label store is open read-only")
        with self._writing() as connection:
            connection.execute("BEGIN IMMEDIATE")
            found = connection.execute(
                "SELECT label_id FROM labels WHERE action = 'label' AND sae_id = ? AND feature_id = ? AND "
                "explainer = ? AND author = ? AND label_id NOT IN "
                "(SELECT retracts FROM labels WHERE action = 'retract') ORDER BY row DESC LIMIT 1",
                (sae_id, feature_id, explainer or "", author),
            ).fetchone()
            if found is None:
                connection.execute("ROLLBACK")
                return None
            connection.execute(
                "INSERT INTO labels (label_id, action, retracts, sae_id, feature_id, explainer, author, created_at) "
                "VALUES (?, 'retract', ?, ?, ?, ?, ?, ?)",
                (uuid.uuid4().hex, found[0], sae_id, feature_id, explainer or "", author, now()),
            )
            connection.execute("COMMIT")
            return found[0]

    def import_rows(self, frame: pl.DataFrame) -> int:
        """Merge exported rows (:meth:`history`) by ``label_id``; how many were new."""
        if self.read_only:
            raise LabelError("the label store is open read-only")
        missing = sorted(set(COLUMNS) - {"row"} - set(frame.columns))
        if missing:
            raise LabelError(f"not a labels export: no column {missing[0]!r}")
        rows = [
            (
                row["label_id"],
                row["action"],
                row["retracts"],
                row["sae_id"],
                int(row["feature_id"]),
                row["explainer"] or "",
                row["text_hash"],
                row["verdict"],
                orjson.dumps(list(row["causes"] or [])).decode(),
                row["note"] or "",
                row["author"],
                row["created_at"],
                row["origin"] or "import",
            )
            for row in frame.sort("row" if "row" in frame.columns else "created_at").iter_rows(named=True)
        ]
        before = self._count()
        self._insert(rows, ignore_known=True)
        return self._count() - before

    def _insert(self, rows: list[tuple], *, ignore_known: bool = False) -> None:
        verb = "INSERT OR IGNORE" if ignore_known else "INSERT"
        with self._writing() as connection:
            connection.execute("BEGIN IMMEDIATE")
            try:
                connection.executemany(
                    f"{verb} INTO labels (label_id, action, retracts, sae_id, feature_id, explainer, text_hash, "
                    "verdict, causes, note, author, created_at, origin) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    rows,
                )
            except sqlite3.IntegrityError as error:
                connection.execute("ROLLBACK")
                raise LabelError(f"label refused by the store: {error}") from None
            connection.execute("COMMIT")

    def _count(self) -> int:
        if not self.exists():
            return 0
        connection = self._connect()
        try:
            return connection.execute("SELECT count(*) FROM labels").fetchone()[0]
        finally:
            connection.close()

    # -- reading ----------------------------------------------------------------------------------

    def history(self) -> pl.DataFrame:
        """Every row ever written, in order (:data:`COLUMNS`)."""
        if not self.exists():
            return pl.DataFrame(schema=COLUMNS)
        connection = self._connect()
        try:
            rows = connection.execute(
                f"SELECT {', '.join(name for name in COLUMNS)} FROM labels ORDER BY row"
            ).fetchall()
        finally:
            connection.close()
        frame = pl.DataFrame(rows, schema={**COLUMNS, "causes": pl.String}, orient="row")
        return frame.with_columns(pl.col("causes").str.json_decode(pl.List(pl.String)))

    def version(self) -> int:
        """The store's state as one number: its newest row (rows are only ever appended), 0 when
        empty or not yet created. Equal versions, equal labels: what reads may be cached on."""
        if not self.exists():
            return 0
        connection = self._connect()
        try:
            return connection.execute("SELECT coalesce(max(row), 0) FROM labels").fetchone()[0]
        finally:
            connection.close()

    def current(self, texts: dict | None = None) -> pl.DataFrame:
        """The current label of every (sae_id, feature_id, explainer): the newest label row not
        taken back; ``stale`` where ``texts`` ((feature_id, explainer) → text) gives another text
        than the one judged, ``explainer`` null for a label of the latent itself. Only the labelled
        texts are hashed: a read costs the labels, not the explanations."""
        history = self.history()
        retracted = history.filter(pl.col("action") == "retract")["retracts"]
        labels = history.filter((pl.col("action") == "label") & ~pl.col("label_id").is_in(retracted.to_list()))
        current = labels.sort("row").unique(["sae_id", "feature_id", "explainer"], keep="last", maintain_order=True)
        current = current.sort("feature_id", "explainer", "row")
        stale = [
            bool(explainer) and texts is not None and text_hash(texts.get((feature, explainer))) != judged
            for feature, explainer, judged in current.select("feature_id", "explainer", "text_hash").iter_rows()
        ]
        return current.with_columns(
            stale=pl.Series(stale, dtype=pl.Boolean),
            explainer=pl.when(pl.col("explainer") == "").then(None).otherwise(pl.col("explainer")),
        ).drop("action", "retracts")
