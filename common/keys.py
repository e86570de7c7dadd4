"""Names that travel between the server and the hospitals (Flower records and keys).

Wire keys are hyphen-case (Flower's convention); metric names are namespaced.
Everything a hospital may send is listed here: the server rejects any other key.
"""

from __future__ import annotations

# Record names inside a Message's RecordDict.
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"

# Train / evaluate instruction (server -> hospital).
SERVER_ROUND = "server-round"
SEED = "seed"
PLANNED_ROUNDS = "planned-rounds"
WIRE_PRECISION = "wire-precision"
DOMAIN_NAMES = "domain-names"
DOMAIN_COUNT = "domain-count"  # federation-wide N_d (sum of the hospitals' unit counts)
DOMAIN_MEAN = "domain-mean"  # federation-wide mu_d (held-out reward of the global adapter; -1 unknown)
HPARAM_PREFIX = "hp."  # e.g. "hp.train.lr": hyper-parameters within the hospital's limits
ONLY_B = "only-lora-b"  # ffa: reply with lora_B tensors only

# Reply status codes (metric STATUS).
STATUS_OK = 0
STATUS_BUDGET_EXHAUSTED = 1
STATUS_NO_DATA = 2
# The round failed at the hospital; the details stay in its own log (no text is sent).
STATUS_ERROR = 3
# The hospital refused the instruction before spending anything: a value out of range or
# not finite, an unknown wire precision, or an adapter unlike its model's (client/instruction.py).
STATUS_REFUSED = 4
# The hospital's evaluation limits (limits.max_evaluations_*) are reached: no metrics are sent.
STATUS_EVAL_LIMIT = 5

# Train reply metrics (hospital -> server).
STATUS = "status"
NUM_EXAMPLES = "num-examples"
LOCAL_STEPS = "train.steps"
ROLLOUT_SECONDS = "train.rollout-s"  # without DP only (wall-clock time reveals sample sizes)
UPDATE_SECONDS = "train.update-s"  # without DP only
REWARD_MEAN = "train.reward-mean"  # without DP only
EPSILON = "dp.epsilon"
DELTA = "dp.delta"
NOISE_MULTIPLIER = "dp.noise-multiplier"
SAMPLE_RATE = "dp.sample-rate"
# Simulation only: the virtual node's partition id, so reports can name hospitals.
SITE_PARTITION = "site.partition"
# Per domain, aligned with DOMAIN_NAMES: privacy units of the training split (client/stats.py),
# released once with the Gaussian mechanism under DP.
D_COUNT = "domain.count"

# Evaluate reply metrics: per domain lists aligned with DOMAIN_NAMES. Exact metrics: without
# DP, or under DP where the hospital opted in (privacy.eval_release: exact).
E_RECORDS = "eval.records"
E_BALANCED_ACCURACY = "eval.balanced-accuracy"
E_MACRO_F1 = "eval.macro-f1"
E_MEAN_IOU = "eval.mean-iou"
E_FORMAT_RATE = "eval.format-rate"
E_MEAN_REWARD = "eval.mean-reward"
E_ACCURACY = "eval.accuracy"
# Under DP (privacy.eval_release: dp): per-domain sums released once per evaluation with the
# Gaussian mechanism (client/privacy_round.py); the server divides them (post-processing).
E_DP_UNITS = "eval.dp.units"  # privacy units evaluated (a patient's records weigh 1 together)
E_DP_ACCURACY_SUM = "eval.dp.accuracy-sum"
E_DP_REWARD_SUM = "eval.dp.reward-sum"
E_DP_FORMAT_SUM = "eval.dp.format-sum"

TRAIN_SCALARS = (STATUS, NUM_EXAMPLES, LOCAL_STEPS, ROLLOUT_SECONDS, UPDATE_SECONDS, REWARD_MEAN,
                 EPSILON, DELTA, NOISE_MULTIPLIER, SAMPLE_RATE, SITE_PARTITION)
TRAIN_PER_DOMAIN = (D_COUNT,)
EVAL_SCALARS = (STATUS, NUM_EXAMPLES, SITE_PARTITION)
EVAL_PER_DOMAIN = (E_RECORDS, E_BALANCED_ACCURACY, E_MACRO_F1, E_MEAN_IOU, E_FORMAT_RATE, E_MEAN_REWARD, E_ACCURACY)
EVAL_DP_PER_DOMAIN = (E_DP_UNITS, E_DP_ACCURACY_SUM, E_DP_REWARD_SUM, E_DP_FORMAT_SUM)

# Hyper-parameters the server may tune per round (finite, valid, and clamped by the hospital's limits).
TUNABLE = (
    "train.steps",
    "train.lr",
    "train.kl_coef",
    "train.ppo_epochs",
    "rollout.num_rollouts",
    "rollout.batch_prompts",
    "rollout.temperature",
    "rollout.top_p",
    "rollout.max_new_tokens",
)
