"""Token selections as SQL: global top-k and the baselines, written under the selection key.

* ``global``: the paper's rule. Rank every candidate token of the pool by score and keep
  exactly round(k * N) (Python's ``round`` of the float k * N: halves go to the even
  integer); a sample may lose all its tokens.
* ``local``: RHO-1 style, the top tokens within each sample, at the same total budget
  round(k * N) as ``global``: each sample keeps floor(k * n_i) or one more, the extra
  tokens going to the samples with the largest remainders k * n_i - floor(k * n_i)
  (largest-remainder apportionment; ties by sample id). Rounding every sample up
  instead keeps 3.8% more tokens than global in the demo, and the comparison of the two
  methods would then be one of budgets as much as of rules.
* ``random``: exactly round(k * N) tokens chosen by a seeded md5 order (reproducible anywhere).
  It ranks no scores, so its N is every response token of the pool, scored or not.
* ``full``: every response token.
* ``sample``: the sample-level baseline on ``global``'s budget. Whole samples, ranked by the mean of their
  candidate (finite) token scores, highest first (ties by sample id), are kept in rank order: the kept set is
  the ranked prefix whose token count is closest to round(k * N), i.e. the sample that crosses the budget is
  kept iff that brings the total strictly closer (so the count is within half that sample's length of the
  budget). A kept sample keeps all its candidate tokens. The paper's sample-level baseline (DS2) rates samples
  with an LLM; ranking samples by their token scores is closer to T-SHIRT.
* ``weighted`` (beyond the paper): every candidate token is kept, with weight 2 * r / (N + 1), r the ascending
  rank of its score among the N candidates (ties: their average rank, 1..N). Weights lie in (0, 2) and average
  exactly 1 over the pool (all-equal scores: exactly 1.0). A rank, not the score itself: scale-free across
  references, bounded so no token dominates a step, and in the same order as ``global`` top-k, whose weights
  are the step function 1[rank in the top k] / k. k does not enter (recorded NULL, like ``full``).

Ties are broken by (sample_id, pos); sample ids are content-addressed, so a selection is
a pure function of its inputs and the same in any database that holds those samples.
Tokens whose score is NaN/inf are never ranked; they are counted and reported.
"""
from __future__ import annotations

import math

from tokenclean.tasks.keys import K_FREE_METHODS, SCORED_METHODS
from tokenclean.tasks.store.data import pool_relation
from tokenclean.tasks.store.db import sql_parts, transaction
from tokenclean.tasks.store.losses import scores_relation
from tokenclean.tasks.store.ranking import global_threshold, global_topk_sql

METHODS = ("global", "local", "random", "full", "sample", "weighted")


def selection_record(con, selection: str) -> dict | None:
    """The stored summary of a complete selection, or None."""
    cur = con.execute("SELECT * FROM selections WHERE selection = ?", [selection])
    row = cur.fetchone()
    return dict(zip([d[0] for d in cur.description], row)) if row else None


def _candidates_sql(dataset: str, parts: list[int], scores: str | None) -> str:
    """Candidate tokens of the pool: with finite scores when ``scores`` is given, else every response token."""
    if scores is None:
        return (f"SELECT rt.sample_id, rt.pos, NULL::FLOAT AS score FROM response_tokens rt "
                f"WHERE rt.sample_id IN (SELECT sample_id FROM {pool_relation(dataset, parts)})")
    return scores_relation(scores, dataset, parts)


def write_selection(con, selection: str, method: str, k: float | None, *, dataset: str, parts: list[int], pool: str,
                    scores: str | None, seed: int) -> dict:
    """Compute and store one selection under its key, in one transaction."""
    if method not in METHODS:
        raise ValueError(f"unknown selection method {method!r}; choose from {METHODS}")
    if method in SCORED_METHODS and scores is None:
        raise ValueError(f"method {method!r} needs scores: pass the key of the token scores to rank")
    ranked, sized = method in SCORED_METHODS, method not in K_FREE_METHODS  # sized: its budget is k
    cand = _candidates_sql(dataset, parts, scores if ranked else None)
    with transaction(con):
        n_cand = con.execute(f"SELECT count(*) FROM ({cand})").fetchone()[0]
        n_keep = int(round(k * n_cand)) if sized else n_cand
        kept_sql, threshold = _kept_sql(con, method, cand, k, n_cand, n_keep, seed)
        con.execute("DELETE FROM selected_tokens WHERE selection = ?", [selection])
        con.execute(f"INSERT INTO selected_tokens (selection, sample_id, pos, weight) "
                    f"SELECT ?, sample_id, pos, weight FROM ({kept_sql})", [selection])
        n_kept = con.execute("SELECT count(*) FROM selected_tokens WHERE selection = ?", [selection]).fetchone()[0]
        quality = selection_quality(con, [selection], dataset, parts)
        precision, recall = quality["precision"], quality["recall"]
        n_bad = 0
        if ranked:
            n_bad = con.execute(f"SELECT count(*) FROM ({scores_relation(scores, dataset, parts, False)}) "
                                f"WHERE score IS NULL OR NOT isfinite(score)").fetchone()[0]
        # recorded as the key sees them: only the inputs this method uses (full ignores k, only random a seed)
        con.execute("INSERT OR REPLACE INTO selections VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, now())",
                    [selection, method, k if sized else None, seed if method == "random" else None,
                     scores if ranked else None, pool, dataset, sql_parts(parts), threshold, n_cand, n_kept,
                     n_bad, precision, recall])
    return {"method": method, "k": k if sized else None, "threshold": threshold, "n_candidates": n_cand,
            "n_kept": n_kept,
            "n_nonfinite_skipped": n_bad, **quality}


def _kept_sql(con, method: str, cand: str, k: float, n_cand: int, n_keep: int, seed: int) -> tuple[str, float | None]:
    """SQL of the kept tokens (sample_id, pos, weight) of ``method`` over ``cand``, and global's threshold."""
    if method == "full":
        return f"SELECT sample_id, pos, NULL::FLOAT AS weight FROM ({cand})", None
    if method == "global":
        # Exact threshold by a few aggregate passes, then a streamed filter: no sort of the candidates
        # (docs/benchmarks.md, Ranking).
        info = global_threshold(con, cand, n_keep, n_total=n_cand)
        return f"SELECT sample_id, pos, NULL::FLOAT AS weight FROM ({global_topk_sql(cand, n_keep, info)})", \
            info["threshold"]
    if method == "random":
        # md5, not DuckDB's hash(): the same key must mean the same tokens in any DuckDB version
        return f"""SELECT sample_id, pos, NULL::FLOAT AS weight FROM ({cand})
                   ORDER BY md5({int(seed)}::VARCHAR || ':' || sample_id::VARCHAR || ':' || pos::VARCHAR),
                            sample_id, pos LIMIT {n_keep}""", None
    if method == "sample":
        return _sample_sql(cand, n_keep), None
    if method == "weighted":
        return _weighted_sql(cand, n_cand), None
    return f"SELECT sample_id, pos, NULL::FLOAT AS weight FROM ({_local_sql(cand, float(k), n_keep)})", None


def _sample_sql(cand: str, n_keep: int) -> str:
    """Whole samples by mean score, the ranked prefix closest to ``n_keep`` tokens (module docstring).

    The mean is over the sample's scores listed in position order, so its float sum, hence the ranking, does not
    depend on how DuckDB splits the aggregation across threads.
    """
    return f"""
        WITH c AS (SELECT sample_id, pos, score FROM ({cand})),
             s AS (SELECT sample_id, count(*) AS n, list_avg(list(score::DOUBLE ORDER BY pos)) AS mean
                   FROM c GROUP BY sample_id),
             r AS (SELECT sample_id, sum(n) OVER (ORDER BY mean DESC, sample_id ROWS UNBOUNDED PRECEDING) AS cum
                   FROM s),
             cut AS (SELECT coalesce(max(cum) FILTER (WHERE cum <= {int(n_keep)}), 0) AS below,
                            min(cum) FILTER (WHERE cum > {int(n_keep)}) AS above FROM r),
             lim AS (SELECT CASE WHEN above - {int(n_keep)} < {int(n_keep)} - below THEN above ELSE below END AS n
                     FROM cut)
        SELECT c.sample_id, c.pos, NULL::FLOAT AS weight FROM c JOIN r USING (sample_id)
        WHERE r.cum <= (SELECT n FROM lim)"""


def _weighted_sql(cand: str, n_cand: int) -> str:
    """Every candidate with weight 2 * (average ascending rank of its score) / (N + 1) (module docstring).

    rank() is the lowest rank of a tie block of size t, whose average rank is rank + (t - 1) / 2: the weight is
    the integer 2 * rank + t - 1 over N + 1, one rounding to double (so equal scores give exactly 1.0).
    """
    return f"""
        SELECT sample_id, pos, ((2 * rank() OVER (ORDER BY score) + count(*) OVER (PARTITION BY score) - 1)::DOUBLE
                                / {int(n_cand) + 1})::FLOAT AS weight
        FROM ({cand})"""


def _local_sql(cand: str, k: float, n_keep: int) -> str:
    """Top tokens per sample, quotas apportioned by largest remainder so they sum to ``n_keep``.

    The arithmetic is exact: k is the fraction p/q its decimal text names (0.6 is 3/5),
    so sample i's share k * n_i is floor (p * n_i) // q plus the remainder (p * n_i) % q
    in q-ths, all integers. Remainders computed in floating point carry rounding noise
    (0.6 * 2 and 0.6 * 7 do not leave the same double remainder), which would let a
    sample's length, not its id, decide between equal remainders.
    """
    from fractions import Fraction

    frac = Fraction(repr(float(k)))
    p, q = frac.numerator, frac.denominator
    return f"""
        WITH c AS (SELECT sample_id, pos, score FROM ({cand})),
             q AS (SELECT sample_id, ({p}::HUGEINT * count(*)) // {q} AS base,
                          ({p}::HUGEINT * count(*)) % {q} AS rest
                   FROM c GROUP BY sample_id),
             extra AS (SELECT sample_id, row_number() OVER (ORDER BY rest DESC, sample_id) AS r FROM q
                       WHERE rest > 0),
             quota AS (SELECT q.sample_id, q.base + CASE WHEN e.r <= {int(n_keep)} - (SELECT sum(base) FROM q)
                                                          THEN 1 ELSE 0 END AS quota
                       FROM q LEFT JOIN extra e USING (sample_id)),
             ranked AS (SELECT sample_id, pos, row_number() OVER (PARTITION BY sample_id ORDER BY score DESC, pos)
                               AS rn FROM c)
        SELECT sample_id, pos FROM ranked JOIN quota USING (sample_id) WHERE rn <= quota"""


def selection_quality(con, selections: list[str], dataset: str, parts: list[int]) -> dict:
    """Kept tokens against ground-truth labels, when the data carries them (else every value is None).

    ``precision``: informative share of the kept tokens; ``recall``: share of the informative
    tokens kept; ``corrupted_kept``: share of the corrupted (noisy-label) tokens kept, the
    figure cleaning exists to push down (``full`` keeps 100%, ``random`` about k).
    Several selections (the self-evolving iterations, each over its own D_t) are scored
    as their union over the union of their pools.
    """
    from tokenclean.tasks.template import TRUTH_CORRUPTED, TRUTH_INFORMATIVE

    row = con.execute(
        f"""
        WITH pool AS (SELECT rt.sample_id, rt.pos, rt.truth FROM response_tokens rt
                      WHERE rt.sample_id IN (SELECT sample_id FROM {pool_relation(dataset, parts)})
                        AND rt.truth IS NOT NULL),
             kept AS (SELECT p.truth FROM pool p SEMI JOIN (SELECT DISTINCT sample_id, pos FROM selected_tokens
                      WHERE selection IN (SELECT unnest(?))) st USING (sample_id, pos))
        SELECT (SELECT count(*) FROM pool), (SELECT count(*) FILTER (WHERE truth = {TRUTH_INFORMATIVE}) FROM pool),
               (SELECT count(*) FILTER (WHERE truth = {TRUTH_CORRUPTED}) FROM pool),
               (SELECT count(*) FROM kept), (SELECT count(*) FILTER (WHERE truth = {TRUTH_INFORMATIVE}) FROM kept),
               (SELECT count(*) FILTER (WHERE truth = {TRUTH_CORRUPTED}) FROM kept)
        """, [list(selections)]).fetchone()
    n_pool, n_inf, n_bad, n_kept, n_kept_inf, n_kept_bad = row
    if not n_pool:
        return {"precision": None, "recall": None, "corrupted_kept": None}
    return {"precision": n_kept_inf / n_kept if n_kept else math.nan,
            "recall": n_kept_inf / n_inf if n_inf else math.nan,
            "corrupted_kept": n_kept_bad / n_bad if n_bad else None}


def kept_by_part(con, selections: list[str], dataset: str, parts: list[int]) -> dict[int, tuple[int, int]]:
    """{part: (kept tokens, response tokens)} of the union of ``selections`` over ``parts``.

    Shows whether a selection favours one split: with ``select.pool: all`` the reference's
    own training split D0 is kept well above the rest.
    """
    rows = con.execute(
        f"""WITH pool AS (SELECT sample_id, part FROM {pool_relation(dataset, parts)}),
                 kept AS (SELECT DISTINCT sample_id, pos FROM selected_tokens WHERE selection IN (SELECT unnest(?)))
            SELECT p.part, count(k.pos), count(*) FROM response_tokens rt JOIN pool p USING (sample_id)
                   LEFT JOIN kept k ON k.sample_id = rt.sample_id AND k.pos = rt.pos
            GROUP BY p.part ORDER BY p.part""", [list(selections)]).fetchall()
    return {int(part): (int(kept), int(total)) for part, kept, total in rows}


def selection_digest(con, selection: str) -> tuple[int, str]:
    """(kept tokens, md5 of the sorted kept (sample_id, pos)): compare selections across databases by content."""
    return con.execute(
        """SELECT count(*), md5(coalesce(string_agg(s.uid || ':' || st.pos::VARCHAR, ',' ORDER BY s.uid, st.pos), ''))
           FROM selected_tokens st JOIN samples s USING (sample_id) WHERE st.selection = ?""", [selection]).fetchone()


def selection_content(con, selection: str) -> str:
    """Key of what training on ``selection`` sees: its kept tokens themselves, as sorted (sample_id, pos), and
    their weights when it has any.

    Sample ids are content-addressed (tokenization, id, content), so two selections with equal
    content train the same adapter whatever produced them: adapters are keyed by this, not by
    the selection's key, so a rescoring that keeps the same tokens retrains nothing (early cutoff).
    Weights enter whenever they are stored (else ``weighted``, which keeps every token as ``full`` does, would
    find full's adapter). Weights that are all 1.0 train exactly as ``full`` does, so their differing key costs a
    retraining that gives the same adapter, never a wrong reuse; unweighted keys stay as they were.
    """
    from tokenclean.tasks.keys import digest

    n, md5, n_weighted, weights = con.execute(
        """SELECT count(*), md5(coalesce(string_agg(sample_id::VARCHAR || ':' || pos::VARCHAR, ','
                                                    ORDER BY sample_id, pos), '')),
                  count(weight), md5(coalesce(string_agg(weight::VARCHAR, ',' ORDER BY sample_id, pos), ''))
           FROM selected_tokens WHERE selection = ?""", [selection]).fetchone()
    return digest("kept-tokens", n, md5, *(["weights", weights] if n_weighted else []))


def is_weighted(con, selection: str) -> bool:
    """Whether ``selection``'s tokens carry training weights (the ``weighted`` method)."""
    return con.execute("SELECT EXISTS (SELECT 1 FROM selected_tokens WHERE selection = ? AND weight IS NOT NULL)",
                       [selection]).fetchone()[0]


def kept_positions(con, selection: str, sample_id: int) -> set[int]:
    return {r[0] for r in con.execute("SELECT pos FROM selected_tokens WHERE selection = ? AND sample_id = ?",
                                      [selection, sample_id]).fetchall()}


def selection_reader(con, selection: str, scores: str | None = None, batch_rows: int = 1024):
    """Arrow record batches of a selection's samples that kept a token, ordered by sample id: the one reader
    training and export stream a selection through, so neither holds it in memory.

    Columns: sample_id, uid, task, input_ids, response_mask, text, char_start, char_end,
    kept (positions), weight (the kept positions' weights; null for an unweighted selection),
    score_pos / score (the token scores ``scores`` ranked; null without it).
    """
    scored = ("SELECT sample_id, list(pos ORDER BY pos) AS score_pos, list(score ORDER BY pos) AS score "
              "FROM token_scores WHERE scores = $scores AND sample_id IN (SELECT sample_id FROM kept) GROUP BY ALL"
              if scores else "SELECT NULL::BIGINT AS sample_id, NULL::INTEGER[] AS score_pos, "
                             "NULL::FLOAT[] AS score WHERE false")
    return con.sql(
        f"""WITH kept AS (SELECT sample_id, list(pos ORDER BY pos) AS kept,
                                 CASE WHEN count(weight) > 0 THEN list(weight ORDER BY pos) END AS weight
                          FROM selected_tokens WHERE selection = $selection GROUP BY sample_id),
                 sc AS ({scored})
            SELECT s.sample_id, s.uid, s.task, s.input_ids, s.response_mask, s.text, s.char_start, s.char_end,
                   k.kept, k.weight, sc.score_pos, sc.score
            FROM kept k JOIN samples s USING (sample_id) LEFT JOIN sc USING (sample_id) ORDER BY s.sample_id""",
        params={"selection": selection, "scores": scores} if scores else {"selection": selection}
    ).to_arrow_reader(batch_rows)


def samples_without_text(con, selections: list[str]) -> int:
    """Samples of ``selections`` ingested before the rendered text was stored (schema 2): no kept spans for them."""
    return con.execute("SELECT count(*) FROM samples WHERE text IS NULL AND sample_id IN "
                       "(SELECT sample_id FROM selected_tokens WHERE selection IN (SELECT unnest(?)))",
                       [list(selections)]).fetchone()[0]
