"""mapc"""
