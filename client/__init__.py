"""The ClientApp side: one site's training and evaluation."""
