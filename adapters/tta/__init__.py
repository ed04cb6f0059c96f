"""Test-time adaptation without labels: the methods (none, bn, tent, eta, eata, psmt), the
interface they share (`base`), robust test-time BatchNorm (`norm`), the Fisher estimate of EATA's
anti-forgetting term (`fisher`) and the collapse guard (`guard`)."""
