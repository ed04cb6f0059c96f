"""What learns from joined labels: the output corrector for regressors (ADCSD) and the low-rank
adapter with the supervised step."""
