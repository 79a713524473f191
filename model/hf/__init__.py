"""Hugging Face format: configuration_nano_llada.py and modeling_nano_llada.py are copied into every export
(trust_remote_code) and import nothing from nano-llada; convert.py writes and reads export directories."""
