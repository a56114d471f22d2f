"""What the producer and the worker share: settings, the job request, events, error codes, the store."""
