"""Scorer: the served scoring path for one model version (imports neither torch nor xgboost).

The ONNX file is the artifact of record and onnxruntime the reference. When the model is a
single ONNX-ML TreeEnsemble the kernel can take (supported node modes, depth within
MAX_KERNEL_DEPTH), it is parsed into padded perfect trees and scored by tree_kernel, which
is faster than both xgboost's inplace_predict and onnxruntime's TreeEnsemble on a request's
rows (benchmarks/scoring.py measures the ratios). The kernel is checked against onnxruntime
on rows placed at the model's own split thresholds before it is trusted; anything else runs
in onnxruntime.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from walkrank.errors import DataError, ModelError
from walkrank.ranking import tree_kernel

FEATURES_INPUT = "features"
SCORE_OUTPUT = "score"

# Padding makes a tree of depth d cost 17 * 2**d bytes (uint64 feature + float32 threshold +
# uint8 NaN direction per node, float32 per leaf): 17 KB at depth 10, so a few hundred trees
# still fit in L2/L3. Deeper trees are not "lightweight" models and waste memory on padding.
MAX_KERNEL_DEPTH = 10
# Rows at thresholds that the kernel must reproduce before it serves a model.
_SELF_CHECK_ROWS = 256
_SELF_CHECK_TOLERANCE = 1e-5

_TREE_OPS = ("TreeEnsembleRegressor", "TreeEnsembleClassifier")
_LEFT_TRUE_MODES = ("BRANCH_LT", "BRANCH_LEQ")
_RIGHT_TRUE_MODES = ("BRANCH_GT", "BRANCH_GTE")
# Modes whose true side is `x < t` or `x > t` need the threshold moved one float32 step so
# that `x >= t'` splits the same rows.
_STRICT_NEXT = {"BRANCH_LT": False, "BRANCH_LEQ": True, "BRANCH_GT": True, "BRANCH_GTE": False}


class KernelUnsupported(Exception):
    """The model is valid ONNX but not a shape the tree kernel evaluates (reason in message)."""


@dataclass(frozen=True)
class PaddedForest:
    """A tree ensemble as perfect trees of one depth, ready for tree_kernel.score_rows."""

    features: np.ndarray  # uint64 (trees, 2**depth - 1)
    thresholds: np.ndarray  # float32, a row goes right where x >= threshold
    nan_right: np.ndarray  # uint8, 1 where a NaN goes right
    leaves: np.ndarray  # float32 (trees, 2**depth)
    depth: int
    base: float
    logistic: bool
    n_features: int

    def splits_by_feature(self) -> list[np.ndarray]:
        """Distinct thresholds of each feature (padding nodes excluded), for probe rows."""
        # Padding nodes carry threshold +inf (both their subtrees are equal).
        real = np.isfinite(self.thresholds)
        feats = self.features[real].astype(np.int64)
        thr = self.thresholds[real]
        return [np.unique(thr[feats == j]) for j in range(self.n_features)]


def onnx_session(onnx_bytes: bytes) -> ort.InferenceSession:
    """An onnxruntime session tuned for serving: one thread, all graph optimizations.

    Serving parallelism comes from concurrent requests; intra-op threads would fight them.
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    try:
        return ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
        raise ModelError(f"onnxruntime cannot load the model: {exc}") from exc


def check_rows(rows: np.ndarray, n_features: int, what: str = "feature matrix") -> np.ndarray:
    """Returns rows as a C-contiguous float32 (n, n_features) matrix or raises DataError."""
    array = np.asarray(rows)
    if array.ndim != 2 or array.shape[1] != n_features:
        raise DataError(f"{what} has shape {array.shape}; expected (rows, {n_features})")
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise DataError(f"{what} has dtype {array.dtype}; expected float32")
    return np.ascontiguousarray(array, dtype=np.float32)


def probe_matrix(splits: list[np.ndarray], n_rows: int, seed: int) -> np.ndarray:
    """Rows that sit exactly on, one float32 step below, and between the given thresholds.

    splits[j] holds the thresholds of feature j. Exact thresholds and their neighbours are
    where converters disagree (`<` vs `<=`, float32 vs float64 thresholds). Each column holds
    every threshold of its feature once exactly and once one step below (when n_rows allows
    2 per threshold), so both sides of every split occur; the remaining values spread between
    the thresholds, and columns are shuffled independently so deep nodes are reached too.
    """
    if n_rows < 1:
        raise DataError(f"probe needs at least one row, got n_rows={n_rows}")
    rng = np.random.default_rng(seed)
    rows = np.empty((n_rows, len(splits)), dtype=np.float32)
    for j, thresholds in enumerate(splits):
        if thresholds.size == 0:
            rows[:, j] = rng.standard_normal(n_rows)
            continue
        t = thresholds.astype(np.float32)
        edges = np.concatenate([t, np.nextafter(t, np.float32(-np.inf))])
        if edges.size >= n_rows:
            rows[:, j] = rng.choice(edges, n_rows, replace=False)
            continue
        lo, hi = float(t.min()), float(t.max())
        span = max(hi - lo, 1.0)
        between = rng.uniform(lo - 0.1 * span, hi + 0.1 * span, n_rows - edges.size)
        rows[:, j] = rng.permutation(np.concatenate([edges, between.astype(np.float32)]))
    return rows


class Scorer:
    """Scores candidate feature matrices with one model; thread-safe, GIL released in the kernel.

    `.engine` is "kernel" or "onnxruntime"; `.reason` says why that engine was chosen.
    """

    def __init__(
        self,
        n_features: int,
        engine: str,
        reason: str,
        forest: PaddedForest | None = None,
        session: ort.InferenceSession | None = None,
    ) -> None:
        self.n_features = n_features
        self.engine = engine
        self.reason = reason
        self._forest = forest
        # Both engines are safe to call from many threads: the kernel only reads the forest
        # and writes its own output array, and InferenceSession.run is thread-safe.
        self._session = session

    @classmethod
    def from_onnx(cls, onnx_bytes: bytes, n_features: int) -> Scorer:
        """Loads a WalkRank ONNX model (input "features" (N, n_features), output "score" (N,))."""
        model = _load_model(onnx_bytes, n_features)
        session = onnx_session(onnx_bytes)
        try:
            forest = parse_tree_ensemble(model, n_features)
        except KernelUnsupported as exc:
            return cls(n_features, "onnxruntime", str(exc), session=session)
        probe = probe_matrix(forest.splits_by_feature(), _SELF_CHECK_ROWS, seed=0)
        kernel_scores = _kernel_score(forest, probe)
        ort_scores = session.run([SCORE_OUTPUT], {FEATURES_INPUT: probe})[0]
        diff = np.abs(kernel_scores.astype(np.float64) - ort_scores.astype(np.float64))
        worst = int(np.argmax(diff))
        if diff[worst] > _SELF_CHECK_TOLERANCE * max(1.0, abs(float(ort_scores[worst]))):
            return cls(
                n_features,
                "onnxruntime",
                f"tree kernel disagreed with onnxruntime on probe row {worst}: "
                f"kernel {kernel_scores[worst]!r}, onnxruntime {ort_scores[worst]!r}",
                session=session,
            )
        n_trees = forest.features.shape[0]
        return cls(
            n_features,
            "kernel",
            f"{n_trees} trees padded to depth {forest.depth} (limit {MAX_KERNEL_DEPTH}), "
            f"matches onnxruntime on {_SELF_CHECK_ROWS} threshold probe rows",
            forest=forest,
        )

    def score(self, rows: np.ndarray) -> np.ndarray:
        """float32 score per row: a probability for binary models, the raw score otherwise."""
        matrix = check_rows(rows, self.n_features)
        if matrix.shape[0] == 0:
            return np.empty(0, dtype=np.float32)
        if self._forest is not None:
            return _kernel_score(self._forest, matrix)
        assert self._session is not None  # from_onnx gives every scorer a forest or a session
        return self._session.run([SCORE_OUTPUT], {FEATURES_INPUT: matrix})[0]


def _kernel_score(forest: PaddedForest, matrix: np.ndarray) -> np.ndarray:
    out = np.empty(matrix.shape[0], dtype=np.float32)
    tree_kernel.score_rows(
        matrix,
        forest.features,
        forest.thresholds,
        forest.nan_right,
        forest.leaves,
        forest.depth,
        np.float32(forest.base),
        forest.logistic,
        out,
    )
    return out


def _load_model(onnx_bytes: bytes, n_features: int) -> onnx.ModelProto:
    try:
        model = onnx.load_from_string(onnx_bytes)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise ModelError(f"model is not a readable ONNX file: {exc}") from exc
    inputs = [i.name for i in model.graph.input]
    outputs = [o.name for o in model.graph.output]
    if inputs != [FEATURES_INPUT]:
        raise ModelError(f"model inputs are {inputs}; expected [{FEATURES_INPUT!r}]")
    if SCORE_OUTPUT not in outputs:
        raise ModelError(f"model outputs are {outputs}; expected one named {SCORE_OUTPUT!r}")
    dims = model.graph.input[0].type.tensor_type.shape.dim
    if len(dims) != 2 or (dims[1].HasField("dim_value") and dims[1].dim_value != n_features):
        shape = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in dims]
        raise ModelError(
            f"model input {FEATURES_INPUT!r} has shape {shape}; expected [batch, {n_features}]"
        )
    return model


def parse_tree_ensemble(model: onnx.ModelProto, n_features: int) -> PaddedForest:
    """Reads the graph WalkRank's converter writes: one TreeEnsemble and its score head.

    Raises KernelUnsupported naming what the kernel cannot take.
    """
    nodes = list(model.graph.node)
    ops = [n.op_type for n in nodes]
    tree_nodes = [n for n in nodes if n.op_type in _TREE_OPS]
    if len(tree_nodes) != 1:
        shown = ", ".join(sorted(set(ops)))
        raise KernelUnsupported(
            f"graph has {len(tree_nodes)} ONNX-ML TreeEnsemble nodes (ops: {shown}); "
            "the kernel takes exactly one"
        )
    tree = tree_nodes[0]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in tree.attribute}
    _check_score_head(model, tree)
    aggregate = _text(attrs.get("aggregate_function", b"SUM"))
    if aggregate != "SUM":
        raise KernelUnsupported(f"aggregate_function {aggregate} (kernel sums trees)")
    post = _text(attrs.get("post_transform", b"NONE"))
    if tree.op_type == "TreeEnsembleRegressor":
        if int(attrs.get("n_targets", 1)) != 1:
            raise KernelUnsupported(f"regressor with n_targets={attrs['n_targets']}")
        if post != "NONE":
            raise KernelUnsupported(f"regressor post_transform {post}")
        prefix, logistic = "target", False
    else:
        labels = list(attrs.get("classlabels_int64s", [])) or list(
            attrs.get("classlabels_strings", [])
        )
        if len(labels) != 2 or post != "LOGISTIC":
            raise KernelUnsupported(
                f"classifier with {len(labels)} classes and post_transform {post}; "
                "the kernel takes binary LOGISTIC classifiers"
            )
        if len(set(attrs.get("class_ids", []))) > 1:
            raise KernelUnsupported("binary classifier with leaf weights for both classes")
        prefix, logistic = "class", True
    base_values = list(attrs.get("base_values", [0.0]))
    if len(base_values) != 1:
        raise KernelUnsupported(f"{len(base_values)} base_values; the kernel takes one")
    return _pad_forest(attrs, prefix, float(base_values[0]), logistic, n_features)


def _check_score_head(model: onnx.ModelProto, tree: onnx.NodeProto) -> None:
    """The only ops allowed after the ensemble are the ones convert.py appends for "score"."""
    others = [n for n in model.graph.node if n is not tree]
    if tree.op_type == "TreeEnsembleRegressor":
        expected = [("Reshape", tree.output[0])]
    else:
        expected = [("Gather", tree.output[1])]
    actual = [(n.op_type, n.input[0]) for n in others]
    if actual != expected or others[0].output[0] != SCORE_OUTPUT:
        raise KernelUnsupported(
            f"graph after {tree.op_type} is {[n.op_type for n in others]}, not the score head "
            f"{[op for op, _ in expected]}"
        )
    if tree.op_type == "TreeEnsembleClassifier":
        gather = others[0]
        index = _initializer(model, gather.input[1])
        axis = next((a.i for a in gather.attribute if a.name == "axis"), 0)
        if index is None or index.size != 1 or int(index.ravel()[0]) != 1 or axis != 1:
            raise KernelUnsupported("classifier score head does not take the class-1 column")


def _initializer(model: onnx.ModelProto, name: str) -> np.ndarray | None:
    for init in model.graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    return None


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _thresholds(attrs: dict) -> np.ndarray:
    """Thresholds as float32 values t' with `x >= t'` equal to `x >= t` for float32 x."""
    if "nodes_values_as_tensor" in attrs:
        raw = numpy_helper.to_array(attrs["nodes_values_as_tensor"]).astype(np.float64)
    else:
        raw = np.asarray(attrs.get("nodes_values", []), dtype=np.float64)
    rounded = raw.astype(np.float32)
    # A float64 threshold between two float32 values splits float32 inputs at the upper one.
    low = rounded.astype(np.float64) < raw
    rounded[low] = np.nextafter(rounded[low], np.float32(np.inf))
    return rounded


def _pad_forest(
    attrs: dict, prefix: str, base: float, logistic: bool, n_features: int
) -> PaddedForest:
    tree_ids = np.asarray(attrs["nodes_treeids"], dtype=np.int64)
    node_ids = np.asarray(attrs["nodes_nodeids"], dtype=np.int64)
    feature_ids = np.asarray(attrs["nodes_featureids"], dtype=np.int64)
    modes = [_text(m) for m in attrs["nodes_modes"]]
    true_ids = np.asarray(attrs["nodes_truenodeids"], dtype=np.int64)
    false_ids = np.asarray(attrs["nodes_falsenodeids"], dtype=np.int64)
    thresholds = _thresholds(attrs)
    n_nodes = tree_ids.size
    tracks_true = np.asarray(
        attrs.get("nodes_missing_value_tracks_true", [0] * n_nodes), dtype=np.int64
    )

    unsupported = sorted(set(modes) - set(_LEFT_TRUE_MODES) - set(_RIGHT_TRUE_MODES) - {"LEAF"})
    if unsupported:
        raise KernelUnsupported(f"node modes {unsupported} (kernel takes BRANCH_LT/LEQ/GT/GTE)")
    branch = np.array([m != "LEAF" for m in modes])
    if branch.any():
        used = feature_ids[branch]
        if used.min() < 0 or used.max() >= n_features:
            raise KernelUnsupported(f"node feature ids outside 0..{n_features - 1}")
        if not np.isfinite(thresholds[branch]).all():
            raise KernelUnsupported("a split threshold is not finite")

    # (tree, node) -> position in the attribute arrays; leaf weights summed per node.
    position = {
        (int(t), int(n)): k for k, (t, n) in enumerate(zip(tree_ids, node_ids, strict=True))
    }
    weights: dict[tuple[int, int], float] = {}
    for t, n, w in zip(
        attrs[f"{prefix}_treeids"],
        attrs[f"{prefix}_nodeids"],
        attrs[f"{prefix}_weights"],
        strict=True,
    ):
        weights[(int(t), int(n))] = weights.get((int(t), int(n)), 0.0) + float(w)

    trees = sorted(set(int(t) for t in tree_ids))
    roots = {}
    for t in trees:
        in_tree = (tree_ids == t) & branch
        children = set(true_ids[in_tree]) | set(false_ids[in_tree])
        candidates = [int(n) for n in node_ids[tree_ids == t] if int(n) not in children]
        if len(candidates) != 1:
            raise KernelUnsupported(f"tree {t} has {len(candidates)} root nodes")
        roots[t] = candidates[0]

    depth = max(
        1, max(_tree_depth(t, roots[t], position, modes, true_ids, false_ids) for t in trees)
    )
    n_internal = (1 << depth) - 1
    features = np.zeros((len(trees), n_internal), dtype=np.uint64)
    # +inf marks padding nodes: both subtrees are equal, and probe rows skip them.
    padded_thresholds = np.full((len(trees), n_internal), np.inf, dtype=np.float32)
    nan_right = np.zeros((len(trees), n_internal), dtype=np.uint8)
    leaves = np.zeros((len(trees), 1 << depth), dtype=np.float32)
    for slot, t in enumerate(trees):
        stack = [(roots[t], 0, 0)]  # (node id, perfect-tree position, level)
        while stack:
            node, pos, level = stack.pop()
            k = position[(t, node)]
            if modes[k] == "LEAF":
                span = 1 << (depth - level)
                first = (pos - ((1 << level) - 1)) * span
                leaves[slot, first : first + span] = weights.get((t, node), 0.0)
                continue
            true_child, false_child = int(true_ids[k]), int(false_ids[k])
            if modes[k] in _LEFT_TRUE_MODES:
                left, right, nan_goes_right = true_child, false_child, not tracks_true[k]
            else:
                left, right, nan_goes_right = false_child, true_child, bool(tracks_true[k])
            threshold = thresholds[k]
            if _STRICT_NEXT[modes[k]]:
                threshold = np.nextafter(threshold, np.float32(np.inf))
            features[slot, pos] = feature_ids[k]
            padded_thresholds[slot, pos] = threshold
            nan_right[slot, pos] = nan_goes_right
            stack.append((left, 2 * pos + 1, level + 1))
            stack.append((right, 2 * pos + 2, level + 1))
    return PaddedForest(
        features=features,
        thresholds=padded_thresholds,
        nan_right=nan_right,
        leaves=leaves,
        depth=depth,
        base=base,
        logistic=logistic,
        n_features=n_features,
    )


def _tree_depth(
    tree: int,
    root: int,
    position: dict[tuple[int, int], int],
    modes: Sequence[str],
    true_ids: np.ndarray,
    false_ids: np.ndarray,
) -> int:
    """The deepest leaf's level below `root`; a tree deeper than the kernel's limit, or one
    that names a node it lacks, is refused."""
    deepest = 0
    stack = [(root, 0)]
    while stack:
        node, level = stack.pop()
        if level > MAX_KERNEL_DEPTH:
            raise KernelUnsupported(
                f"tree {tree} is deeper than the kernel limit of {MAX_KERNEL_DEPTH} levels"
            )
        k = position.get((tree, node))
        if k is None:
            raise KernelUnsupported(f"tree {tree} refers to missing node {node}")
        if modes[k] == "LEAF":
            deepest = max(deepest, level)
            continue
        stack.append((int(true_ids[k]), level + 1))
        stack.append((int(false_ids[k]), level + 1))
    return deepest
