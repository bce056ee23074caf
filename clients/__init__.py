"""Client libraries for voicefoundry; the Python SDK lives in clients/python."""
