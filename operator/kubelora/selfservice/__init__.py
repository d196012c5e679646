"""The self-service API: the OpenAI Files and Fine-tuning API in front of LoRAJobs (``kubelora api``).

See docs/self-service.md.
"""
