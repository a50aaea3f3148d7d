"""The stream's fast paths against the plain code they replaced (issue 26): the tar header checksum by Adler-32 and
the one-pass AU labels, each equal to the straightforward computation on arbitrary inputs."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from ssau.data.decode import au_labels, au_targets
from ssau.data.tario import _checksum

AUS = (1, 2, 4, 6, 7, 10, 12, 14, 15, 17, 23, 24)


@settings(max_examples=300, derandomize=True, database=None)
@given(st.one_of(st.binary(min_size=512, max_size=512), st.sampled_from([bytes(512), b"\xff" * 512])))
def test_the_adler32_checksum_is_the_tar_byte_sum(hdr):
    assert _checksum(hdr) == sum(hdr[:148]) + 8 * 32 + sum(hdr[156:])


def _reference(meta, aus, hidden):
    """The two per-AU loops au_labels replaced, as they were."""
    pos = {au: j for j, au in enumerate(meta.get("aus") or [])}
    inten = meta.get("intensity") or []
    t, m, v, vm = ([0.0] * len(aus) for _ in range(4))
    for i, au in enumerate(aus):
        j = pos.get(au)
        if j is not None and meta["mask"][j] and not (hidden and hidden[i]):
            t[i], m[i] = float(meta["occurrence"][j]), 1.0
            if j < len(inten) and inten[j] >= 0:
                v[i], vm[i] = float(inten[j]), 1.0
    return t, m, v, vm


@st.composite
def metas(draw):
    aus = draw(st.lists(st.sampled_from(AUS + (9, 25, 26)), max_size=15))  # repeats and AUs outside the list
    n = len(aus)
    mask = draw(st.lists(st.sampled_from([0, 1]), min_size=n, max_size=n))
    occ = [draw(st.sampled_from([0, 1])) if k else draw(st.sampled_from([-1, 0])) for k in mask]
    meta = {"aus": aus, "occurrence": occ, "mask": mask}
    inten = draw(st.one_of(st.none(), st.lists(st.sampled_from([-1, 0, 1, 2.5, 5]), min_size=n, max_size=n)))
    if inten is not None:
        meta["intensity"] = inten
    return meta


@settings(max_examples=300, derandomize=True, database=None)
@given(metas(), st.one_of(st.none(), st.lists(st.booleans(), min_size=len(AUS), max_size=len(AUS))))
def test_one_pass_labels_equal_the_per_au_loops(meta, hidden):
    assert au_labels(meta, AUS, hidden) == _reference(meta, AUS, hidden)
    assert au_targets(meta, AUS, hidden) == _reference(meta, AUS, hidden)[:2]
    assert au_labels({}, AUS) == ([0.0] * len(AUS),) * 4


def test_the_validation_split_read_by_byte_spans_equals_a_pass_over_the_shards(corpora):
    from ssau.data.sources import SourceConfig, StreamConfig
    from ssau.data.stream import TrainStream
    from ssau.data.trainset import TrainingSet

    cfg = StreamConfig(labelled=SourceConfig((str(corpora.bp4d()),), folds=(2, 3)), m1=4, m2=0, image_size=32,
                       workers=0, validation=0.3)
    for world in (1, 2):
        by_spans = [TrainStream(cfg, rank=r, world=world).sources["validation"].samples for r in range(world)]
        ts = TrainingSet.read(cfg)
        assert ts.validation.spans and set(ts.validation.spans) == set(ts.validation.keys)
        ts.validation.spans = None  # as from an index without byte spans
        by_pass = [TrainStream(cfg, rank=r, world=world, trainset=ts).sources["validation"].samples
                   for r in range(world)]
        assert by_spans == by_pass and all(by_spans)
