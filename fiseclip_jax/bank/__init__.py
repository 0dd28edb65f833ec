"""Online inspection: a reference bank of known-good images, new images scored against it one at a time.

    bank = build_bank(params, cfg, good_pixels, text, method, capacity=32, mode="exact")
    det = detect_with_bank(params, cfg, bank, pixels, text, method)
    det, feats = detect_with_bank(..., with_features=True)
    bank = update_bank(bank, feats, gate(bank, feats))
    save_bank("bank/", bank); bank = load_bank("bank/", params=params)

See core.py (the pytree and the pure functions), match.py (exact and coreset matching), store.py.
"""

from .core import (MODES, Bank, BankMeta, bank_from_features, bank_threshold, build_bank, check_method,
                   detect_with_bank, encode_in_batches, gate, masked_quantile, update_bank)
from .fingerprint import weights_fingerprint
from .match import greedy_kcenter
from .store import (bank_digest, bank_info, check_compatible, load_bank, meta_from_record, method_from_record,
                    read_bank_json, save_bank)

__all__ = ["MODES", "Bank", "BankMeta", "bank_digest", "bank_from_features", "bank_info", "bank_threshold",
           "build_bank", "check_compatible", "check_method", "detect_with_bank", "encode_in_batches", "gate",
           "greedy_kcenter",
           "load_bank", "masked_quantile", "meta_from_record", "method_from_record", "read_bank_json", "save_bank",
           "update_bank", "weights_fingerprint"]
