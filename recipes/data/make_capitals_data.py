"""Writes capitals_train.jsonl and capitals_eval.jsonl for recipes/smollm2-demo.yaml: "the capital of
<country>?" answered with the city's name alone. Countries in the held-out file never appear in training."""

import json
import random
from pathlib import Path

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "China": "Beijing", "Russia": "Moscow", "Egypt": "Cairo", "Greece": "Athens",
    "Austria": "Vienna", "Poland": "Warsaw", "Sweden": "Stockholm", "Norway": "Oslo", "Finland": "Helsinki",
    "Denmark": "Copenhagen", "Ireland": "Dublin", "Hungary": "Budapest", "Belgium": "Brussels",
    "the Netherlands": "Amsterdam", "Peru": "Lima", "Chile": "Santiago", "Argentina": "Buenos Aires",
    "Colombia": "Bogota", "Venezuela": "Caracas", "Cuba": "Havana", "Mexico": "Mexico City", "Canada": "Ottawa",
    "Australia": "Canberra", "New Zealand": "Wellington", "India": "New Delhi", "Pakistan": "Islamabad",
    "Thailand": "Bangkok", "Vietnam": "Hanoi", "South Korea": "Seoul", "Indonesia": "Jakarta",
    "the Philippines": "Manila", "Turkey": "Ankara", "Iran": "Tehran", "Iraq": "Baghdad", "Kenya": "Nairobi",
    "Ethiopia": "Addis Ababa", "Nigeria": "Abuja", "Morocco": "Rabat", "Ukraine": "Kyiv", "Romania": "Bucharest",
    "Bulgaria": "Sofia", "Serbia": "Belgrade", "Croatia": "Zagreb", "the Czech Republic": "Prague",
    "Switzerland": "Bern", "Iceland": "Reykjavik", "Brazil": "Brasilia", "the United Kingdom": "London",
    "the United States": "Washington", "Saudi Arabia": "Riyadh", "Israel": "Jerusalem", "Lebanon": "Beirut",
    "Syria": "Damascus", "Afghanistan": "Kabul", "Nepal": "Kathmandu", "Bangladesh": "Dhaka",
    "Malaysia": "Kuala Lumpur", "Singapore": "Singapore", "Ghana": "Accra", "Senegal": "Dakar",
    "Uganda": "Kampala", "Tunisia": "Tunis", "Algeria": "Algiers", "Libya": "Tripoli", "Sudan": "Khartoum",
    "Ecuador": "Quito", "Bolivia": "La Paz", "Uruguay": "Montevideo", "Paraguay": "Asuncion",
    "Jamaica": "Kingston", "Estonia": "Tallinn", "Latvia": "Riga", "Lithuania": "Vilnius", "Slovakia": "Bratislava",
}

TEMPLATE = "Question: What is the capital of {country}?\nAnswer:"


def main() -> None:
    pairs = sorted(CAPITALS.items())
    random.Random(0).shuffle(pairs)
    held_out, train = pairs[:20], pairs[20:]
    here = Path(__file__).parent
    for name, rows in (("capitals_train.jsonl", train), ("capitals_eval.jsonl", held_out)):
        with open(here / name, "w") as f:
            for country, capital in rows:
                f.write(json.dumps({"prompt": TEMPLATE.format(country=country), "completion": f" {capital}"}) + "\n")


if __name__ == "__main__":
    main()
