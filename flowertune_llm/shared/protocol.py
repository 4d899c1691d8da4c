"""The wire protocol: every name a message between server and clients carries, in one place.

Server -> client (train and evaluate):  ARRAYS (the global adapter, in `transfer.dtype`) and
CONFIG (LEARNING_RATE and RUN_ROUND for training; PROXIMAL_MU when the strategy is FedProx).
Client -> server, train:     ARRAYS (the update, trained minus received) and METRICS
(TRAIN_LOSS, NUM_EXAMPLES, timings and memory).
Client -> server, evaluate:  METRICS (EVAL_LOSS, NUM_EXAMPLES, the exact-match counts below).
Both apps and the strategy import these names; nothing else spells them.
"""

# Record names in a message's RecordDict.
ARRAYS = "arrays"
METRICS = "metrics"
CONFIG = "config"

# Train config entries the strategy adds each round.
LEARNING_RATE = "learning-rate"
RUN_ROUND = "run-round"  # the round's number in the whole run (Flower counts from 1 after a resume)
# Flower's FedProx puts its mu here in the train config.
PROXIMAL_MU = "proximal-mu"

# Metric entries of a reply. Flower's strategies weight means by NUM_EXAMPLES.
NUM_EXAMPLES = "num-examples"
TRAIN_LOSS = "train_loss"
EVAL_LOSS = "eval_loss"
# Exact-match counts: overall in every evaluate reply; per task as "<key>/<task>" for the tasks a
# node's held-out share holds, so the server sums them (shared/answer_counts.py).
EXACT_MATCH_CORRECT = "exact-match-correct"
EXACT_MATCH_TOTAL = "exact-match-total"
PER_TASK_SEPARATOR = "/"
