"""Networks: the EMNet enhancer (and, in later issues, the external memory and its query encoders)."""
