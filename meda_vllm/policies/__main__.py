from meda_vllm.policies import settings_table

print(settings_table(), end="")
