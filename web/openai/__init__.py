"""The OpenAI API: requests read and checked (requests), the routes and their replies (routes)."""
