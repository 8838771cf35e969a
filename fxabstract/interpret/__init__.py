"""The interpretability suite: combined abstractions (`combined`), causal explanatory graphs
(`explanations`), and compact proofs on group-operation networks (`proofs`, `groups`)."""
