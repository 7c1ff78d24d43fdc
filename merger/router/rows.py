"""The rows of the merge-or-route table that are not pool members; no member may take one's name."""

ROUTER_ROW = "router"
LOGISTIC_ROW = "logistic regression"
KNN_ROW = "k-NN"
ORACLE_ROW = "oracle"
ROUTED_ROWS = (ROUTER_ROW, LOGISTIC_ROW, KNN_ROW)
TABLE_ROWS = (*ROUTED_ROWS, ORACLE_ROW)
