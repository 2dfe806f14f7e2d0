"""Order-preserving sequence packing: which samples of a micro-batch share a row (``data.packing``).

Packing happens inside one collated micro-batch: the samples stay in the batch they were read in and in their
order, so a batch's resume position (the order key of its last row) means what it means without packing. Kept
free of torch: ``owl2 data stats`` measures padding with the same rule the collator packs by.
"""

from __future__ import annotations

from collections.abc import Sequence


def rows_of(lengths: Sequence[int], max_length: int) -> list[int]:
    """Samples per row when samples of ``lengths`` decoder tokens share rows of up to ``max_length``, in order.

    Each row takes consecutive samples, so concatenating the rows gives back the original order. Of all such
    splits the one chosen runs the fewest tokens, rows x the longest row (the batch's width); ties go to more,
    shorter rows (a masked attention's work grows with the square of the row). Filling each row as far as it
    goes (next fit) can leave the last row short while the first sets the width: captions of 27, 43, 35, 31, 40,
    29, 38 and 33 tokens in rows of 192 fill 5 + 3 and run 2 x 176 tokens, more than unpacked (8 x 43), where
    4 + 4 runs 2 x 140. One sample a row is among the splits, so packing never runs more tokens than padding; a
    batch holding a sample longer than ``max_length`` (truncation normally rules that out) stays one sample a row.
    """
    count = len(lengths)
    longest = max(lengths, default=0)
    best, best_cost = [1] * count, count * longest
    if longest > max_length:
        return best
    for rows in range(1, count):
        if rows * longest > best_cost:
            break  # no split into this many rows or more can run as few tokens
        low, high = max(longest, -(-sum(lengths) // rows)), max_length
        if len(_fill(lengths, high)) > rows:
            continue  # needs more rows even at full width
        while low < high:  # the narrowest width that still fits the samples into `rows` rows
            middle = (low + high) // 2
            low, high = (low, middle) if len(_fill(lengths, middle)) <= rows else (middle + 1, high)
        split = _fill(lengths, low)
        cost = len(split) * max(_row_sums(lengths, split))
        if (cost, -len(split)) < (best_cost, -len(best)):
            best, best_cost = split, cost
    return best


def _fill(lengths: Sequence[int], width: int) -> list[int]:
    """Next fit: samples per row when each row takes samples while they fit in ``width`` tokens."""
    rows: list[int] = []
    used = width
    for length in lengths:
        if used + length <= width:
            rows[-1] += 1
            used += length
        else:
            rows.append(1)
            used = length
    return rows


def _row_sums(lengths: Sequence[int], rows: Sequence[int]) -> list[int]:
    sums, start = [], 0
    for count in rows:
        sums.append(sum(lengths[start : start + count]))
        start += count
    return sums


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
        row_lengths = _row_sums(lengths, rows_of(lengths, max_length))
        packed += len(row_lengths) * max(row_lengths)
    if not real:
        return {}
    return {"padded": round(real / padded, 4), "packed": round(real / packed, 4)}
