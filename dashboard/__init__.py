"""The Streamlit dashboard over drill reports: `lab dashboard` or `streamlit run dashboard/app.py`."""
