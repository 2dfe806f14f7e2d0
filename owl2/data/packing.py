"""Order-preserving sequence packing: which samples of a micro-batch share a row (``data.packing``).

Packing happens inside one collated micro-batch: the samples stay in the batch they were read in and in their
order, so a batch's resume position (the order key of its last row) means what it means without packing. Kept
free of torch: ``owl2 data stats`` measures padding with the same rule the collator packs by.
"""

from __future__ import annotations

from collections.abc import Sequence


def rows_of(lengths: Sequence[int], max_length: int) -> list[int]:
    """Samples per row when samples of ``lengths`` decoder tokens fill rows of up to ``max_length``, in order.

    Next fit: a sample joins the current row if it still fits, else it starts the next one. Concatenating the
    rows gives back the original order (first fit would fill earlier rows with later samples). A sample longer
    than ``max_length`` (truncation normally rules that out) gets a row of its own.
    """
    rows: list[int] = []
    used = max_length
    for length in lengths:
        if rows and used + length <= max_length:
            rows[-1] += 1
            used += length
        else:
            rows.append(1)
            used = length
    return rows


def padding_efficiency(batches: Sequence[Sequence[int]], max_length: int) -> dict[str, float]:
    """Real decoder tokens over the decoder tokens run, for micro-batches of samples of the given lengths.

    ``padded``: one sample a row, each batch as wide as its longest sample; ``packed``: rows packed by
    :func:`rows_of`, each batch as wide as its longest row. 1.0 means no padding at all; no samples, no figures.
    """
    real = padded = packed = 0
    for lengths in batches:
        if not lengths:
            continue
        real += sum(lengths)
        padded += len(lengths) * max(lengths)
        row_lengths, start = [], 0
        for count in rows_of(lengths, max_length):
            row_lengths.append(sum(lengths[start : start + count]))
            start += count
        packed += len(row_lengths) * max(row_lengths)
    if not real:
        return {}
    return {"padded": round(real / padded, 4), "packed": round(real / packed, 4)}
