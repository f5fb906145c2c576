"""Service logic: decisions over records, with the database and storage fetched around them."""
