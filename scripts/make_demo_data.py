#!/usr/bin/env python3
"""Generate the Northwind Home support-ticket demo dataset (stdlib only, seeded).

Northwind Home is a fictional online home-goods retailer (furniture, textiles,
kitchenware, lighting and a small range of "Northwind" smart-home devices).
Each example is one customer ticket routed to exactly one of six departments,
with a short reply to the customer, in OpenAI chat format:

    {"messages": [{"role": "system", ...}, {"role": "user", ...},
                  {"role": "assistant", "content": "Department: X\\nReply: ..."}]}

Tickets are built compositionally: for each department there are 25+
situations, each with several phrasings and matching reply templates, plus slot
fills (products, order ids, amounts, dates, names), optional openers/closers,
tone add-ons and light noise (lowercase, typos).  About 15% of tickets are
deliberate hard cases governed by the routing rules in ROUTING_RULES below.

Usage:
    python scripts/make_demo_data.py                 # writes examples/data/support/
    python scripts/make_demo_data.py --seed 1 --out /tmp/support --n-train 200

Same seed and counts -> byte-identical files.
"""

from __future__ import annotations

import argparse
import json
import re
import string
from pathlib import Path
from random import Random

DEPARTMENTS = ["Billing", "Technical Support", "Shipping", "Returns", "Account Security", "Sales"]

SYSTEM = (
    "You route customer support tickets for Northwind Home, an online home-goods store. "
    "Pick exactly one department: Billing, Technical Support, Shipping, Returns, "
    "Account Security, Sales. Answer with 'Department: <name>' on the first line, "
    "then 'Reply: <short reply to the customer>' on the second line."
)

HARD_CASE_RATE = 0.15
NEAR_DUPLICATE = 0.8  # word-set Jaccard similarity at which an eval ticket counts as a train near-duplicate

ROUTING_RULES = [
    (
        "Billing vs Returns",
        "Anything about what the customer was charged or refunded being wrong (duplicate "
        "charge, overcharge, missing discount, refund for the wrong amount, unexpected fee) "
        "goes to Billing, even if the item is being returned. Sending items back, exchanges, "
        "return labels and pickups, damaged/defective/wrong/incomplete items, and \"where is "
        "my refund\" for an item already sent back go to Returns.",
    ),
    (
        "Account Security vs Technical Support",
        "Any trouble signing in to the Northwind account (passwords, reset links, login "
        "codes, lockouts, Sign in with Apple/Google) goes to Account Security, even inside "
        "the smart-home app. Device faults, app features (sharing, schedules, notifications), "
        "voice-assistant linking and website errors go to Technical Support.",
    ),
    (
        "Account Security vs Billing",
        "If the customer suggests someone else used their account (orders they did not "
        "place, a drained gift card, a charge together with a login or password-change "
        "alert), it goes to Account Security. A charge they merely cannot identify or think "
        "is wrong goes to Billing.",
    ),
    (
        "Technical Support vs Returns",
        "A faulty device where the customer asks for help making it work goes to Technical "
        "Support; where they ask for a replacement or to send it back, it goes to Returns.",
    ),
    (
        "Shipping vs Returns",
        "Anything not yet received (late, lost, partial delivery, an item missing from the "
        "parcel, a replacement still in transit, a carrier 'return to sender') goes to "
        "Shipping. An item that arrived damaged (even if the courier caused it), wrong, or "
        "missing assembly parts goes to Returns.",
    ),
    (
        "Sales vs the rest",
        "Questions before buying (stock, product details, compatibility, financing, delivery "
        "times or destinations, subscriptions) go to Sales even when they mention shipping, "
        "payments or devices. A price adjustment on an order already placed goes to Billing.",
    ),
    (
        "Shipping vs Billing",
        "\"I paid for express and it still hasn't shipped\" goes to Shipping (the request is "
        "the delivery); a shipping fee charged when the order should have shipped free goes "
        "to Billing.",
    ),
]

# --------------------------------------------------------------------------- slot data

# (canonical name, price, aliases customers use)
FURNITURE = [
    ("Alder oak side table", 149, ["Alder oak side table", "oak side table", "side table"]),
    ("Birch bookshelf (5-tier)", 219, ["Birch bookshelf", "birch bookshelf", "5-tier bookshelf"]),
    ("Fjord 3-seat sofa", 1299, ["Fjord sofa", "Fjord 3-seat sofa", "sofa"]),
    ("Harbor dining chairs (set of 2)", 189, ["Harbor dining chair set", "dining chair set"]),
    ("Maple writing desk", 349, ["Maple writing desk", "maple desk", "writing desk"]),
    ("Cedar entryway bench", 129, ["Cedar bench", "entryway bench", "cedar bench"]),
    ("Walnut coffee table", 399, ["Walnut coffee table", "walnut coffee table", "coffee table"]),
    ("Pine bunk bed", 579, ["Pine bunk bed", "bunk bed"]),
    ("Rattan accent chair", 259, ["Rattan accent chair", "rattan chair", "accent chair"]),
    ("Ash platform bed frame (queen)", 649, ["Ash bed frame", "platform bed", "bed frame"]),
]
TEXTILES = [
    ("Linen duvet cover (queen)", 119, ["Linen duvet cover", "linen duvet cover", "duvet cover"]),
    ("Waffle cotton bath towels (set of 4)", 48, ["waffle towel set", "Waffle cotton towel set", "bath towel set"]),
    ("Merino wool throw", 79, ["wool throw", "Merino wool throw", "throw blanket"]),
    ("Velvet cushion cover", 19, ["velvet cushion cover", "cushion cover"]),
    ("Cotton bath mat", 29, ["bath mat", "cotton bath mat"]),
    ("Jute area rug (5x8)", 189, ["jute rug", "Jute area rug", "rug"]),
    ("Percale sheet set (king)", 99, ["percale sheet set", "Percale sheet set", "sheet set"]),
]
KITCHEN = [
    ('Cast iron skillet (10")', 39, ["cast iron skillet", "skillet"]),
    ("Stoneware dinner plates (set of 6)", 72, ["stoneware plate set", "dinner plate set"]),
    ("Glass storage jars (set of 3)", 29, ["glass jar set", "storage jar set"]),
    ("Copper kettle", 64, ["copper kettle", "kettle", "Copper kettle"]),
    ("Bamboo cutting board", 22, ["bamboo cutting board", "cutting board"]),
    ("Ceramic pour-over set", 45, ["pour-over set", "ceramic pour over set"]),
]
DECOR = [
    ("Brass floor lamp", 159, ["brass floor lamp", "floor lamp", "Brass floor lamp"]),
    ("Rattan pendant shade", 69, ["rattan pendant", "pendant shade"]),
    ("Ceramic table lamp", 89, ["ceramic lamp", "table lamp"]),
    ("Round oak wall mirror", 119, ["wall mirror", "round mirror"]),
    ("Terracotta planter (large)", 42, ["terracotta planter", "planter"]),
]
SMART = [
    ("Northwind SmartPlug", 24.99, ["SmartPlug", "smart plug", "Northwind SmartPlug"]),
    ("Northwind SmartBulb", 14.99, ["SmartBulb", "smart bulb", "Northwind SmartBulb"]),
    ("Northwind Thermostat", 179, ["thermostat", "Northwind Thermostat", "smart thermostat"]),
    ("Northwind Video Doorbell", 129, ["video doorbell", "doorbell", "Video Doorbell"]),
    ("Northwind Air Purifier", 249, ["air purifier", "purifier", "Air Purifier"]),
    ("Northwind Smart Diffuser", 59, ["diffuser", "Smart Diffuser"]),
    ("Northwind Motion Sensor", 29, ["motion sensor", "Motion Sensor"]),
]
SIZED = [
    ("Linen duvet cover", ["twin", "full", "queen", "king"]),
    ("Percale sheet set", ["full", "queen", "king"]),
    ("Jute area rug", ["5x8", "8x10", "9x12"]),
    ("Blackout curtain set", ["84-inch", "96-inch", "108-inch"]),
]
PRODUCT_SLOTS = {
    "product": FURNITURE + TEXTILES + KITCHEN + DECOR,
    "big": FURNITURE,
    "device": SMART,
    "switchable": [d for d in SMART if d[0] in
                   ("Northwind SmartPlug", "Northwind SmartBulb", "Northwind Air Purifier", "Northwind Smart Diffuser")],
    "textile": TEXTILES,
    "kitchen": KITCHEN,
    "decor": DECOR,
}
ITEM_SLOT_ORDER = ["product", "big", "device", "switchable", "textile", "kitchen", "decor", "sized"]

FIRST = ["Maria", "James", "Priya", "Tom", "Aisha", "Kenji", "Laura", "Diego", "Sarah", "Omar",
         "Chloe", "Ben", "Fatima", "Lucas", "Emily", "Wei", "Hannah", "Marcus", "Sofia", "Daniel",
         "Grace", "Ahmed", "Olivia", "Raj", "Nina", "Sam", "Elena", "Kevin", "Zoe", "Luis",
         "Megan", "Tariq", "Ingrid", "Joe", "Rosa", "Ethan"]
LAST = ["Lopez", "Smith", "Patel", "Nguyen", "Khan", "Tanaka", "Miller", "Garcia", "Brown", "Haddad",
        "Martin", "Cohen", "Okafor", "Silva", "Walsh", "Chen", "Becker", "Reed", "Rossi", "Kim",
        "Murphy", "Ali", "Johnson", "Sharma", "Novak", "Evans", "Ivanova", "O'Brien"]
CITIES = ["Denver", "Columbus", "Sacramento", "Raleigh", "Tucson", "Omaha", "Portland", "Boise",
          "Memphis", "Spokane", "Albany", "Madison", "Dallas", "Newark", "Fresno", "Miami"]
CARRIERS = ["UPS", "FedEx", "USPS", "OnTrac"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December"]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"]
WHEN = ["yesterday", "last week", "on Monday", "last Friday", "on the 12th", "two weeks ago",
        "3 days ago", "this morning", "over the weekend", "on Tuesday", "10 days ago",
        "at the start of the month", "last Thursday"]
PHONES = ["iPhone 13", "iPhone 15", "Pixel 7", "Galaxy S22", "Galaxy A54", "OnePlus 11", "iPad"]
COLORS = ["sage", "charcoal", "oat", "navy", "terracotta", "ivory", "slate blue", "mustard",
          "forest green", "blush"]
ROOMS = ["living room", "bedroom", "hallway", "home office", "guest room", "studio apartment",
         "dining room"]
CODES = [("WELCOME10", 10), ("SPRING15", 15), ("HOME20", 20), ("COZY15", 15), ("NEWHOME10", 10),
         ("FALL20", 20)]
EMAIL_DOMAINS = ["gmail.com", "outlook.com", "yahoo.com", "icloud.com", "proton.me"]

# --------------------------------------------------------------------------- situations


def S(key, t, r, hard=False):
    return {"key": key, "t": t, "r": r, "hard": hard}


BILLING = [
    S("double_charge",
      ["I was charged twice for order {order}. Two charges of {price} on my card ending in {last4}.",
       "why are there 2 payments of {price} for the same order?? {order}",
       "Looks like my card got billed twice for the {product}. Can you refund one of them please?",
       "My bank statement shows the same {price} charge from Northwind Home two times. I only placed one order."],
      ["Sorry about the duplicate charge on {order_ref}; the extra payment will be reversed within 3-5 business days.",
       "Thanks for spotting this - we'll refund the second {price} charge within 3-5 business days.",
       "Apologies for the double charge on {item}; we've cancelled the duplicate payment."]),
    S("overcharged",
      ["The checkout said {price} for the {product} but my bank shows {higher}. What happened?",
       "Charged {higher} instead of {price} on order {order}. Please fix.",
       "hi, the amount taken from my account doesn't match my order total. order {order}",
       "I think I was overcharged. My order total was {price} but {higher} came out of my account."],
      ["We'll check the charge against the total for {order_ref} and refund any difference.",
       "Sorry for the confusion - any overcharge on {order_ref} will be refunded within 5 business days."]),
    S("promo_not_applied",
      ["I used code {code} at checkout but the discount wasn't applied to order {order}.",
       "The {code} code said it was accepted but I paid full price for the {product}??",
       "Your email said {pct}% off with {code}. I entered it and still got charged the full {price}."],
      ["If {code} was valid when you ordered, we'll refund the discount on {order_ref}.",
       "We'll check the {code} code on {order_ref} and credit the difference if it qualified."]),
    S("forgot_code",
      ["I forgot to enter my welcome code {code} on order {order}. Can it still be applied?",
       "Placed my order {when} and only now saw I had a {pct}% off code. Any chance you can apply it?",
       "can you add my discount code after ordering? forgot it at checkout"],
      ["Codes can be added within 7 days of purchase, so we'll apply {code} and refund the discount.",
       "If {order_ref} is less than 7 days old, we can still apply your code and refund the difference."]),
    S("invoice_request",
      ["Could you send me an itemised invoice for order {order}? I need it for my company expenses.",
       "Need a proper invoice (not just the confirmation email) for {order}, with our business name on it.",
       "Hello, where can I download the invoice for my last order? Accounting is asking for it."],
      ["We'll email an itemised invoice for {order_ref} within one business day.",
       "Happy to help - reply with the business name you need on it and we'll send the invoice today."]),
    S("update_card",
      ["How do I change the card saved on my account? The old one expired.",
       "my card on file expired and i have an order waiting to ship. how do i update it",
       "Got a new debit card from my bank. Where do I update the payment details for my orders?"],
      ["You can update it under Account > Payment methods; pending orders will retry on the new card.",
       "Please add the new card under Account > Payment methods and remove the old one."]),
    S("payment_declined",
      ["My payment keeps getting declined at checkout but the card works everywhere else.",
       "Tried to pay for the {product} three times, card declined every time. The money is definitely there.",
       "Why does my card get declined on your site?? Tried two different cards."],
      ["Declines usually come from your bank's fraud check, so please call them or try PayPal instead.",
       "Sorry for the hassle; a quick call to your bank usually clears it, and your cart stays saved."]),
    S("unknown_charge",
      ["There's a {amount} charge from NORTHWIND HOME on my statement from {when} and I can't match it to any order.",
       "What is this charge for {amount}? I don't remember buying anything recently.",
       "I see a payment to Northwind Home for {amount} and I'm not sure what it's for. Which order does it belong to?"],
      ["We'll look up the {amount} charge and email you the order it belongs to.",
       "Please reply with the card's last 4 digits and we'll tell you which order the {amount} was for."]),
    S("cancelled_pending",
      ["I cancelled order {order} {when} but there's still a pending charge of {price}.",
       "Cancelled my order the same day and the money still hasn't come back. {order}",
       "why am I still being charged for an order I cancelled?? the {product} order was cancelled right away"],
      ["That's only a pending hold, and your bank should release it within 3-7 business days.",
       "Since {order_ref} was cancelled, the hold will drop off within 3-7 business days."]),
    S("installment",
      ["I'm paying for the {big} in 4 installments and the second payment was taken twice {when}.",
       "The pay-later installment for order {order} came out early. It wasn't due until the 1st.",
       "My installment plan for the {big} shows 3 payments left but my statement says 2. Which is right?"],
      ["We'll check the payment schedule for {order_ref} and refund anything taken in error.",
       "Sorry for the confusion - we'll email you the correct installment schedule for {order_ref}."]),
    S("gift_card_not_applied",
      ["I paid partly with a gift card but the full {price} was charged to my credit card.",
       "Entered my gift card on order {order} and it still charged my Visa for everything.",
       "The gift card balance wasn't used on my order, my card got the whole amount instead."],
      ["We'll apply the gift card to {order_ref} and refund the difference to your card.",
       "Sorry about that - we'll refund your card for the amount the gift card should have covered."]),
    S("tax_exempt",
      ["Why was sales tax charged on {order}? We're a registered nonprofit and tax exempt.",
       "Our school is tax exempt but we were charged {amount} in tax on our last order. How do we get it back?",
       "Can you remove the sales tax from order {order}? I have an exemption certificate."],
      ["Please reply with your exemption certificate and we'll refund the tax on {order_ref}.",
       "Once we have your certificate, we'll refund the sales tax and mark your account exempt."]),
    S("assembly_fee",
      ["My receipt has an assembly fee of {asm_fee} that I never selected.",
       "There's a {asm_fee} 'assembly service' line on order {order}. I'm building the {big} myself, please remove it.",
       "Why did I pay for assembly? I didn't tick that box."],
      ["Sorry about that - we'll remove the assembly fee from {order_ref} and refund it.",
       "We'll refund the {asm_fee} assembly charge within 3-5 business days."]),
    S("partial_cancel_charged",
      ["One item from order {order} was cancelled because it was out of stock, but I was still charged for it.",
       "You cancelled the {product} from my order (out of stock) but I paid {price} for it and never got that back.",
       "got an email that part of my order was cancelled. my card was still charged the full amount??"],
      ["We'll refund the cancelled item on {order_ref} within 3-5 business days.",
       "Sorry for the mix-up; the refund for the out-of-stock item is being processed today."]),
    S("invoice_reminder",
      ["We received a payment reminder for invoice {inv} but we paid it by bank transfer {when}.",
       "Why are we getting overdue notices for invoice {inv}? It was paid last week.",
       "Our business account shows invoice {inv} as unpaid. The transfer went out {when}, can you check?"],
      ["Please send the transfer reference and we'll mark invoice {inv} as paid.",
       "Sorry for the confusion - once we match your payment, the reminders for {inv} will stop."]),
    S("paypal_pending",
      ["Paid with PayPal, money left my account but the order still says payment pending. {order}",
       "PayPal shows I paid {price} but your site says my order isn't paid. Which is it?",
       "My order is stuck on 'awaiting payment' even though PayPal took the money yesterday."],
      ["PayPal can take a few hours to confirm; if needed, we'll match the payment to {order_ref} manually.",
       "Thanks - we'll match your PayPal payment to {order_ref} so it can ship."]),
    S("care_plan_after_cancel",
      ["I cancelled my Care+ protection plan last month but was charged {monthly} again {when}.",
       "Still being billed {monthly} a month for Care+ after cancelling. Please stop it and refund this month.",
       "how do I stop the monthly Care+ charge? I thought I cancelled it already"],
      ["Sorry about that - we'll confirm the Care+ cancellation and refund the latest charge.",
       "We'll make sure Care+ is cancelled and refund any charge after your cancellation date."]),
    S("change_payment_method",
      ["Can I change the payment method for order {order}? It hasn't shipped yet and I'd rather use my other card.",
       "I accidentally paid with my business card for the {product}. Can you switch it to my personal card?",
       "is it possible to move my order payment to a different card?"],
      ["We can switch cards before {order_ref} ships - please call us so we can take the details securely.",
       "Please give us a call to change the card; we can't take card numbers by email."]),
    S("receipt_missing",
      ["I never got a confirmation email or receipt for order {order}.",
       "Could you resend the receipt for the {product}? I need it for a warranty claim.",
       "no receipt in my inbox after paying {price}. did the order go through?"],
      ["We've re-sent the receipt for {order_ref} to your account email; please check spam too.",
       "Your receipt for {order_ref} is on its way to the email on your account."]),
    S("foreign_fee",
      ["My bank charged me a {bank_fee} foreign transaction fee on my Northwind order. Aren't you a US company?",
       "Why was my order processed as international? I got a fee from my bank.",
       "Got an international fee on my card for order {order}, never happens with other shops."],
      ["We charge in US dollars from the US, so the fee comes from your card issuer.",
       "Our payments are processed in the US in USD, so please check the fee with your bank."]),
    S("store_credit",
      ["I have {amount} in store credit from a return, how do I use it?",
       "My store credit isn't showing at checkout. It should be {amount}.",
       "Does store credit expire? I got {amount} back as credit a few months ago."],
      ["Store credit doesn't expire and shows at checkout when you're signed in.",
       "If your {amount} credit isn't showing, reply with your account email and we'll add it."]),
    S("net_terms",
      ["Can our business account be switched to monthly invoicing instead of card payments?",
       "We order from you every month for our rental properties. Do you offer net-30 terms?",
       "Is it possible to pay by invoice instead of credit card? We're a small design studio."],
      ["Approved business accounts can pay on net-30 invoices; send us your company details to apply.",
       "We offer monthly invoicing for regular business customers - reply with your company name to start."]),
    S("price_adjustment",
      ["I bought the {product} for {price} {when} and now it's on sale. Can I get the difference back?",
       "Ordered the {big} last week and today it's 20% cheaper. Do you do price adjustments?",
       "Saw the {product} I just bought is cheaper now. order {order}. kinda annoying"],
      ["Orders within 14 days qualify for a price adjustment, so we'll refund the difference on {order_ref}.",
       "We'll compare the sale price with {order_ref} and refund the difference if it qualifies."],
      hard=True),
    S("shipping_fee_charged",
      ["I was charged {ship_fee} for shipping even though my order was over $75, which should ship free.",
       "Why is there a shipping charge on order {order}? The site said free delivery.",
       "Free shipping was on the banner but I paid {ship_fee} for delivery of the {product}."],
      ["Orders over $75 ship free, so we'll refund the shipping fee on {order_ref}.",
       "Sorry about that - we'll refund the {ship_fee} shipping charge to your original payment method."],
      hard=True),
    S("double_charge_return",
      ["I was charged twice for the {product} I want to return. Can you fix the double charge first?",
       "Before I send back the {product}: you took {price} twice for it. Order {order}.",
       "double charged on order {order}. I'm also returning one item but the double charge is the main problem"],
      ["We'll reverse the duplicate charge on {order_ref}; the return can be started separately.",
       "Sorry about the double charge - the extra payment will be refunded within 3-5 business days."],
      hard=True),
    S("wrong_refund_amount",
      ["My return for order {order} was processed but the refund was {short} less than I paid.",
       "Got my refund for the {product} but it's short. I paid {price}, where is the rest?",
       "You refunded me for one towel set but I returned two. Please refund the difference."],
      ["We'll check the refund on {order_ref} and send the missing amount to your card.",
       "Sorry about the shortfall; the difference will be refunded within 3-5 business days."],
      hard=True),
    S("subscription_charge",
      ["The video doorbell was supposed to work without a subscription, so why am I being billed {monthly} a month?",
       "I'm getting a monthly charge for 'Northwind Cloud' on my card. I never signed up, I just use the doorbell.",
       "App works fine but I keep getting charged for cloud video storage I never signed up for."],
      ["We'll cancel the recurring cloud charge and refund your most recent payment.",
       "Sorry about that - the Video Doorbell works without a subscription, so we'll stop the charge and refund it."],
      hard=True),
]

TECH = [
    S("wifi_setup",
      ["My {device} won't connect to wifi. The light just keeps blinking.",
       "Setup fails at the last step every time, says 'could not join network'. It's the {device}.",
       "Trying to add the new {device} in the app and it never finds my wifi. Router is right next to it.",
       "cant get the {device} online. tried 5 times"],
      ["The {device} only joins 2.4 GHz wifi, so please reset it and add it again on that network.",
       "Please hold the button for 10 seconds to reset the {device}, then run setup again in the app."]),
    S("device_offline",
      ["The app says my {switchable} is offline but it's plugged in and the light is on.",
       "My {switchable} keeps dropping offline a few times a day. Other devices on my wifi are fine.",
       "Why does my {switchable} show 'unavailable' every morning? I have to unplug it to fix it."],
      ["Please update the {switchable} firmware in the app and check its wifi signal.",
       "Dropouts usually mean a weak signal, so try moving the {switchable} closer to your router."]),
    S("firmware_stuck",
      ["The firmware update on my {switchable} has been stuck at 60% for over an hour.",
       "update failed halfway and now the {switchable} doesn't respond at all",
       "My {switchable} tried to update overnight and now the light is solid red."],
      ["Please unplug the {switchable} for 30 seconds; it will retry the update automatically.",
       "A power cycle usually clears a stuck update, so unplug it for 30 seconds and try again."]),
    S("thermostat_reading",
      ["The thermostat says it's 72 in here but it's clearly colder. My other thermometer says 66.",
       "Northwind Thermostat reading is off by about 5 degrees. Is there a way to calibrate it?",
       "thermostat keeps showing the wrong temp so the heating never kicks in"],
      ["You can calibrate it under Settings > Temperature offset in the app.",
       "Readings drift near lamps, vents or sunny windows; adjust it under Settings > Temperature offset."]),
    S("doorbell_notifications",
      ["My Video Doorbell stopped sending motion alerts to my phone.",
       "Doorbell rings inside but I don't get any notifications on my phone since the update.",
       "No alerts from the doorbell for days. A courier came yesterday and I got nothing."],
      ["Please allow notifications for our app in your phone settings, then toggle Motion alerts off and on.",
       "Check that app notifications are on in your phone settings and update the doorbell firmware."]),
    S("app_crash",
      ["The Northwind Home app crashes every time I open it since the last update. {phone}.",
       "App closes straight away when I tap on my devices. Already reinstalled it.",
       "your app keeps crashing on my {phone}, it's unusable"],
      ["Please update the app and restart your phone; if it still crashes, send us the app version.",
       "Sorry about that - please send your phone model and app version so we can investigate."]),
    S("schedule_not_running",
      ["I set a schedule for my {switchable} to turn on at 7pm but it never triggers.",
       "Schedules aren't working on the {switchable}. It turns on at the wrong time, like an hour late.",
       "my {switchable} ignores the timer i set in the app"],
      ["Schedules follow your home's time zone, so please check it under Settings > Home and re-save.",
       "Please check the time zone in the app settings, then save the schedule for the {switchable} again."]),
    S("filter_light",
      ["I replaced the filter in my Air Purifier but the filter light is still on.",
       "New filter installed, red light won't go away on the purifier. How do I reset it?",
       "The air purifier keeps saying replace filter even though the filter is brand new."],
      ["Hold the filter button for 5 seconds to reset the light, or tap Reset filter in the app.",
       "The filter light needs a manual reset: hold the filter button for 5 seconds."]),
    S("bulb_flicker",
      ["My SmartBulbs flicker when I dim them below 30%.",
       "The smart bulbs in my kitchen flicker like crazy. Is that normal?",
       "Bulbs flicker and buzz at low brightness"],
      ["SmartBulbs shouldn't be on a wall dimmer, so set the switch to full and dim from the app.",
       "Flicker usually means a dimmer switch; leave it at full and control brightness in the app."]),
    S("cart_issue",
      ["Items keep disappearing from my cart on your website.",
       "I add the {product} to my cart and when I go to check out the cart is empty.",
       "Cart resets every time I refresh the page. Using Chrome on a laptop."],
      ["Please allow cookies for our site or sign in, which keeps your cart saved.",
       "This usually happens when cookies are blocked; please allow them or try another browser."]),
    S("diffuser",
      ["My Smart Diffuser isn't misting anymore. The light comes on but nothing happens.",
       "Diffuser stopped producing mist after 2 weeks. I use the oils you sell.",
       "smart diffuser makes a noise but no mist"],
      ["Please clean the ultrasonic plate with a cotton swab and a little rubbing alcohol.",
       "Oil residue usually stops the mist, so gently clean the plate with a swab and white vinegar."]),
    S("motion_sensor_false",
      ["The Motion Sensor turns my lights on when nobody is in the room.",
       "Motion sensor goes off randomly at night. Is it my cat?",
       "Motion Sensor keeps switching the hallway light on at 2am for no reason."],
      ["Lower the sensor's sensitivity in the app and angle it away from windows and heaters.",
       "Try the low sensitivity setting, which ignores most small pets."]),
    S("share_access",
      ["How do I give my husband access to control the {switchable}?",
       "Can my roommate use the app to control our {switchable} from her own phone?",
       "want to share the thermostat with my family, how?"],
      ["Go to Home > Members in the app and invite them by email.",
       "You can invite them under Home > Members so they control the {switchable} from their own account."]),
    S("manual_missing",
      ["Lost the setup guide for my {device}. Where can I find instructions?",
       "Is there a manual for the {device} online? Box didn't have one.",
       "where are the instructions for the {device}"],
      ["The setup guide for the {device} is in the app under Help and on our Support page.",
       "You'll find the manual for the {device} on our website under Support > Manuals."]),
    S("doorbell_chime",
      ["Installed the Video Doorbell but my old indoor chime doesn't ring anymore.",
       "Doorbell works in the app but the mechanical chime in the hall is silent.",
       "after wiring the doorbell the chime just buzzes"],
      ["In the doorbell settings, set Chime type to Mechanical; the included power kit fixes the rest.",
       "Please set the chime type to Mechanical in the app, and fit the power kit from the box if needed."]),
    S("thermostat_power",
      ["Installed the Thermostat and it says 'low power, C-wire needed'. What do I do?",
       "New thermostat keeps restarting by itself. My old one worked fine with the same wires.",
       "Thermostat screen goes blank every few hours, wiring looks right"],
      ["That means there's no C-wire, so please fit the power adapter included in the box.",
       "Please install the included power adapter; the wiring guide is in the app under Help."]),
    S("bluetooth_setup",
      ["The app can't find my {device} during setup. Bluetooth is on.",
       "Stuck on 'searching for devices' forever when adding the {device}.",
       "app won't detect the new {device}. tried on 2 phones"],
      ["Please give the app Bluetooth and location permission and keep your phone next to the {device}.",
       "The app needs location and Bluetooth permission to find new devices; please check both and retry."]),
    S("energy_zero",
      ["The energy monitoring on my SmartPlug always shows 0 W even with a heater plugged in.",
       "SmartPlug usage stats are empty for the last week.",
       "energy graph for my smart plug is blank in the app"],
      ["Energy data needs the latest firmware, so please update the SmartPlug in the app.",
       "Please update the SmartPlug firmware; the energy graph fills in after about an hour."]),
    S("assembly_help",
      ["Building the {big} and the holes for step 7 don't line up. Am I doing something wrong?",
       "The instructions for the {big} are really confusing. Which way do the side panels go?",
       "Halfway through assembling the {big} and stuck. Is there a video?"],
      ["There's an assembly video for the {big} on its product page - reply with a photo if you're stuck.",
       "Sorry it's tricky! Send us a photo of where you are and we'll walk you through it."]),
    S("voice_assistant",
      ["Alexa says 'device is not responding' when I ask her to turn on the {switchable}.",
       "Google Assistant can't control my {switchable} anymore, it worked last week.",
       "voice commands stopped working for all my Northwind devices"],
      ["Please disable and re-enable the Northwind Home skill, then run device discovery.",
       "Re-linking the Northwind Home skill in your voice assistant app usually fixes this."]),
    S("automation",
      ["My Motion Sensor should turn on the hallway SmartBulbs but the automation never runs.",
       "Created an automation in the app, the sensor triggers but the lights don't come on.",
       "automations stopped working after I renamed my rooms"],
      ["Please open the automation and re-select the sensor and bulbs, then save it again.",
       "Try recreating the automation so it picks up the current device names."]),
    S("too_many_alerts",
      ["How do I stop the app sending me a notification every time the {switchable} turns on?",
       "I'm getting way too many alerts from the {switchable}, can I turn some off?",
       "the app pings me constantly. please make it stop"],
      ["Open the {switchable} in the app, go to Notifications and switch off what you don't need.",
       "You can pick which alerts you get under Settings > Notifications in the app."]),
    S("website_images",
      ["Product photos on your site don't load, I just see grey boxes. Chrome on Windows.",
       "Your website is super slow and the pictures never load on my phone.",
       "Can't see any images on the product pages since yesterday"],
      ["Please clear your browser cache or pause your ad blocker; we've told our web team too.",
       "Sorry about that - we've passed this to our web team, and clearing your cache usually helps."]),
    S("bulb_color",
      ["My SmartBulbs have a pink tint when set to warm white.",
       "The colours of my smart bulbs don't match each other even on the same setting.",
       "One SmartBulb is way brighter than the others in the same room"],
      ["Please update all the bulbs' firmware and group them in the app to keep them in sync.",
       "Bulbs on different firmware can look different, so update them all and control them as a group."]),
    S("doorbell_video_lag",
      ["Live view on my Video Doorbell is really laggy and pixelated.",
       "The doorbell video freezes after a few seconds every time I open it.",
       "live video from the doorbell takes forever to load"],
      ["Laggy video usually means weak wifi at the door; check the signal in the doorbell settings.",
       "A wifi extender near the front door usually fixes choppy live view."]),
    S("google_linking",
      ["Can't link my {device} to Google Home, it keeps saying 'account linking failed'. I can log in to your app fine.",
       "Alexa skill says it couldn't link my Northwind account. My password is correct, I use the app every day.",
       "account linking with google home fails every time, login on your site works"],
      ["Your account is fine - please unlink Northwind Home in Google Home or Alexa and link it again.",
       "Please remove Northwind Home from your voice assistant app, restart your phone and link it again."],
      hard=True),
    S("checkout_error",
      ["I try to pay and the checkout page just says 'Something went wrong'. My card isn't even charged.",
       "The Place order button doesn't do anything on your site. Tried 3 times to buy the {product}.",
       "checkout page freezes at the payment step on my phone"],
      ["That's a page error, not your card; please try another browser while our web team checks it.",
       "Sorry about that - please try our app or another browser, and we've reported the error."],
      hard=True),
    S("help_before_return",
      ["My {device} stopped working after a week. Can you help me get it going before I think about returning it?",
       "Thinking of returning the {device} because it keeps disconnecting, but would rather fix it. Any ideas?",
       "before i send this {device} back, is there a reset or something i can try"],
      ["Let's try a factory reset first: hold the button for 10 seconds, then add the {device} again.",
       "Happy to help - please factory-reset the {device} from the app and set it up again."],
      hard=True),
    S("wifi_password_changed",
      ["I changed my wifi password and now my {device} is offline. How do I update it?",
       "New router, new password, and none of my Northwind devices connect anymore.",
       "after changing the wifi password the {device} won't reconnect"],
      ["The {device} still has the old wifi details, so please reset it and add it again in the app.",
       "After a wifi change each device needs a reset and setup again; your schedules are kept."],
      hard=True),
    S("doorbell_footage",
      ["My doorbell camera recorded someone at my door at 3am but the clip won't play. I need it for security reasons.",
       "Security footage from the Video Doorbell won't load, just a spinning circle.",
       "Someone tried my front door last night and the doorbell video won't download. Please help."],
      ["Please update the app and download the clip on wifi; clips are kept for 7 days.",
       "Clips are stored for 7 days, so try again on wifi after updating the app."],
      hard=True),
]

SHIPPING = [
    S("where_is_order",
      ["Where is my order? I ordered the {product} {when} and haven't heard anything.",
       "Order {order} still hasn't arrived. It's been {days} days.",
       "hi, any update on order {order}? it was supposed to be here by {weekday}",
       "I placed an order almost two weeks ago and still nothing. Can someone tell me what's going on?"],
      ["Sorry for the wait - we'll check with the carrier and email you tracking for {order_ref} today.",
       "We're looking into {order_ref} now and will email you a delivery update within one business day."]),
    S("tracking_stuck",
      ["Tracking for {order} hasn't updated in {days} days. It just says 'in transit'.",
       "My tracking has been stuck at the {carrier} facility in {city} since {when}.",
       "tracking number doesnt show anything, says label created only"],
      ["We've opened a trace with {carrier} and will update you within 2 business days.",
       "Sorry about that - we'll open a trace for {order_ref} and email you once we hear back."]),
    S("delivered_not_received",
      ["Tracking says my package was delivered {when} but I never got it.",
       "{carrier} marked order {order} as delivered but there's nothing at my door. I checked with the neighbours too.",
       "It says delivered. It is NOT here. order {order}"],
      ["We'll open a claim with the carrier for {order_ref} and send a replacement or refund if it isn't found.",
       "Carriers sometimes scan early, so please check again tomorrow; if it's still missing, we'll replace it."]),
    S("change_address",
      ["I need to change the delivery address for order {order}. I put my old address by mistake.",
       "Can I change where my order is being shipped? We just moved to {city}.",
       "wrong address on my order!! it hasn't shipped yet, please update it"],
      ["If {order_ref} hasn't shipped, we can update it - please reply with the full new address.",
       "Please reply with the correct address and we'll update {order_ref} or redirect it with the carrier."]),
    S("reschedule_furniture",
      ["I need to reschedule delivery of the {big}. I won't be home on {weekday}.",
       "The delivery company booked my {big} for {weekday} morning but I'm at work. Can we move it?",
       "Can the delivery of order {order} be moved to next week? Something came up."],
      ["No problem - our delivery partner will call you to pick a new time for {order_ref}.",
       "We'll rebook the delivery of the {big}; expect a call within one business day."]),
    S("partial_delivery_boxes",
      ["Only one box of my {big} arrived. It's supposed to come in 2 boxes.",
       "Got box 1 of 3 for the {big}. Where are the others?",
       "Received part of order {order}. Tracking only shows one package."],
      ["Large items often ship in separate boxes; we'll email you tracking for the rest of {order_ref}.",
       "The other boxes may arrive a day or two later - we'll confirm where they are."]),
    S("left_wrong_place",
      ["The courier left my parcel outside in the rain. Everything's fine, but please tell them to stop doing this.",
       "Your driver left my package with a neighbour I don't even know. The address is clearly marked.",
       "Delivery was left at the wrong house again. I had to walk down the street to get it."],
      ["Sorry about that; we've reported it to the carrier and added a delivery note to your account.",
       "Thanks for telling us - we've passed this on to the carrier."]),
    S("expedite",
      ["Can I upgrade order {order} to express shipping? I need it by {weekday}.",
       "Is there any way to speed up delivery of the {product}? It's a birthday present for {date}.",
       "need my order faster, can i pay for next day"],
      ["If {order_ref} hasn't shipped yet, we can upgrade it to express; we'll email you the cost first.",
       "We'll check whether {order_ref} can still go express and email you the options today."]),
    S("not_shipped_yet",
      ["My order {order} has said 'processing' for {days} days. When will it ship?",
       "Ordered {when} and the order still hasn't shipped. Is something wrong?",
       "Why hasn't my {product} shipped yet? The site said ships in 1-2 days."],
      ["Sorry for the delay; we'll check with the warehouse and email you a ship date for {order_ref}.",
       "We're checking the status of {order_ref} and will update you within one business day."]),
    S("address_problem",
      ["{carrier} says my address was incomplete and the package can't be delivered. The address is correct!",
       "Got a notice that delivery failed because of an invalid address. My apartment number is on the order.",
       "carrier couldn't find my address. order {order}"],
      ["Please reply with your full address, including apartment number, and we'll ask the carrier to redeliver.",
       "We'll send the carrier your correct address so they can try again with {order_ref}."]),
    S("missed_delivery",
      ["I missed the delivery for {order}. How do I get it redelivered?",
       "{carrier} left a card saying they tried to deliver while I was out. Can they come back on {weekday}?",
       "missed the delivery guy today, what now"],
      ["The carrier usually tries again the next business day, or you can pick a date on the tracking page.",
       "We'll ask the carrier to reattempt delivery of {order_ref}."]),
    S("split_shipment",
      ["Why did my order come in separate packages? I've only got 2 of the 4 items.",
       "The {product} arrived but nothing else from order {order}. Are the rest coming?",
       "received one package today but tracking mentions another one. is that right?"],
      ["Items can ship from different warehouses; we'll email you tracking for the rest of {order_ref}.",
       "Yes, some orders are split, and we'll send tracking for the remaining items on {order_ref}."]),
    S("combine_orders",
      ["I placed two orders today, can you ship them together to save on packaging?",
       "Can order {order} and my second order ship in the same box?",
       "please combine my orders into one delivery"],
      ["If neither order has left the warehouse, we'll try to ship them together.",
       "We'll combine them if both are still in our warehouse and confirm by email."]),
    S("delivery_instructions",
      ["Please ask the driver to use the back door, the front steps are being repaired. Order {order}.",
       "Can you add the gate code {gate} to my delivery? Drivers can't get in otherwise.",
       "How do I add delivery instructions to an order I already placed?"],
      ["We've added your delivery note to {order_ref} and passed it to the carrier.",
       "Thanks - the driver will see your instructions for {order_ref} on the day."]),
    S("stairs_delivery",
      ["I ordered the {big}. Will the delivery team carry it up to my 3rd floor apartment? There's no lift.",
       "Does the delivery for my {big} order include bringing it inside, or is it curbside only?",
       "My {big} is arriving on {weekday}. Are the delivery guys going to bring it upstairs?"],
      ["Standard delivery is to your front door; we can add Room of Choice delivery to {order_ref} for a fee.",
       "We can upgrade {order_ref} to Room of Choice so the team carries the {big} inside."]),
    S("date_keeps_moving",
      ["The estimated delivery date for {order} has changed three times now.",
       "My delivery date keeps getting pushed back. First it was {weekday}, now it says next week.",
       "Why does the delivery estimate for my {big} keep moving?"],
      ["Sorry about that - we'll confirm a firm delivery date for {order_ref} with the carrier.",
       "We understand the frustration; we'll email you the confirmed delivery date today."]),
    S("wrong_tracking",
      ["The tracking number you sent me is for a package going to {city}. That's not me.",
       "Tracking link for order {order} shows someone else's delivery.",
       "i think you sent me the wrong tracking number"],
      ["Sorry for the mix-up - we'll email you the correct tracking number for {order_ref}.",
       "Thanks for flagging it; the right tracking link for {order_ref} is on its way."]),
    S("hold_shipment",
      ["I'll be away from {date} for two weeks. Can you hold my order until I'm back?",
       "Please don't ship order {order} until {date}, nobody will be home.",
       "Can you delay shipping my {big}? Our move has been postponed."],
      ["We can hold {order_ref} for up to 30 days - just tell us when to ship it.",
       "No problem, we'll hold {order_ref}; reply when you're ready and we'll send it."]),
    S("signature_required",
      ["Does my delivery need a signature? I'm at work all day.",
       "Carrier wants someone to sign for order {order}. Can they leave it at the door instead?",
       "can the {product} be delivered without a signature"],
      ["Orders over $500 need a signature; for smaller ones we can ask the carrier to leave it safely.",
       "We'll ask the carrier to release {order_ref} without a signature if the order value allows."]),
    S("gift_shipping",
      ["I'm sending the {product} as a gift. Can you leave the prices off the packing slip?",
       "Can I add a gift message to order {order}? It's going straight to my mum.",
       "is it too late to make my order a gift? don't want the receipt in the box"],
      ["We'll mark {order_ref} as a gift so the packing slip shows no prices.",
       "If {order_ref} isn't packed yet, reply with your message and we'll add it."]),
    S("missing_from_box",
      ["My package arrived but the {product} wasn't in it. The packing slip lists it.",
       "Order {order} came today but one item is missing from the box.",
       "Got the box but only 3 of the 4 things I ordered were inside."],
      ["Sorry about that - we'll check whether it shipped separately and send it if not.",
       "We'll ship the missing item from {order_ref}, or refund it if it's out of stock."]),
    S("work_address",
      ["Can the driver deliver to my office between 9 and 5? Order {order}.",
       "My building's reception closes at 6, can you make sure delivery is before that?",
       "My order is going to my work address. Anything I need to know?"],
      ["We've added a business-hours note to {order_ref}, though we can't promise an exact time.",
       "Carriers usually deliver to businesses before 5 pm, and we've noted your hours on {order_ref}."]),
    S("backorder_update",
      ["I ordered the {big} when it was on backorder. Any update on when it ships?",
       "The {product} on my order {order} was backordered. Is there a new date?",
       "still waiting on my backordered item, it's been {days} days"],
      ["We'll check the latest restock date and email you a ship date for {order_ref}.",
       "Sorry for the wait - we'll email you as soon as {item} ships."]),
    S("lost_wants_refund",
      ["The {product} still hasn't arrived after {days} days. If it's lost, I want a refund.",
       "If my package is lost, can I just get my money back instead? Order {order}.",
       "Tracking hasn't moved in a week. Either find it or refund me please."],
      ["We'll trace {order_ref} with the carrier; if it's lost, we'll refund you in full.",
       "If {order_ref} isn't found within 2 business days, we'll refund it or send a replacement."],
      hard=True),
    S("return_to_sender",
      ["Tracking says my package is 'returning to sender'. I didn't ask to return anything!",
       "Why is order {order} being sent back to you? I never got it and I still want it.",
       "the tracking for my {product} says return to sender?? i haven't even received it yet"],
      ["The carrier is sending {order_ref} back after a failed delivery; we'll reship it as soon as it arrives.",
       "We'll try to stop the return, or reship {order_ref} once it's back with us."],
      hard=True),
    S("express_not_shipped",
      ["I paid for express shipping on {order} and it still hasn't shipped. Where is it?",
       "Paid extra for next-day delivery and it's been 3 days. Tracking shows nothing.",
       "you charged me for express delivery but my {product} still hasn't left the warehouse"],
      ["Sorry for the delay - we'll email you tracking for {order_ref} today and refund the express fee if it's late.",
       "We're chasing the warehouse on {order_ref}; if express wasn't met, we'll refund the upgrade."],
      hard=True),
    S("replacement_in_transit",
      ["My replacement for the broken {product} still hasn't arrived. It's been {days} days.",
       "You were sending a replacement for my damaged order {order}. Any tracking?",
       "where is the replacement you promised? the first one was cracked"],
      ["We'll email you the tracking number for the replacement on {order_ref} today.",
       "Sorry for the wait - we're looking up your replacement shipment now."],
      hard=True),
    S("app_shows_shipped",
      ["The Northwind Home app says my order shipped {when} but there's no tracking link.",
       "App says 'shipped' for order {order} but the tracking number doesn't work.",
       "your app shows my {product} as shipped but there's no tracking info anywhere"],
      ["Tracking can take 24 hours to activate; if it's still blank tomorrow, we'll check with the carrier.",
       "We'll email you the carrier and tracking number for {order_ref} today."],
      hard=True),
]

RETURNS = [
    S("how_to_return",
      ["How do I return the {product}? It's not quite what I wanted.",
       "I'd like to return order {order}. What's the process?",
       "want to send back the {product}, how do i start a return",
       "Hi, the {product} just isn't right for our {room}. Can I return it?"],
      ["Start a return for {item} from your order page and we'll email a prepaid label.",
       "Returns are free within 30 days - choose Return item on your order page to get a label."]),
    S("arrived_damaged",
      ["The {decor} arrived damaged. There's a crack right across the base.",
       "My {big} came with a broken leg. Order {order}. Really disappointed.",
       "Just unboxed the {big} and it's scratched all over the top.",
       "Opened the box and the {kitchen} is chipped. Can I get a new one?"],
      ["Sorry it arrived damaged! Send us a photo and we'll replace {item} free of charge.",
       "We're sorry - reply with a photo and we'll send a replacement or refund, whichever you prefer."]),
    S("wrong_item",
      ["I ordered the {textile} in {color} but received {color2}.",
       "Wrong item in my box. I got a doormat instead of the {product}. Order {order}.",
       "you sent me the wrong thing!! i ordered the {product}"],
      ["We'll send {item} in {color} today, plus a prepaid label for the {color2} one.",
       "Sorry for the mix-up; we'll send the correct item today with a prepaid label for the wrong one.",
       "Apologies - we'll send the right item for {order_ref} and a label to return the other."]),
    S("label_request",
      ["I started a return but never got the return label.",
       "The return label link for order {order} gives an error.",
       "Can you email me the return label again? I deleted it by accident."],
      ["We've re-sent the prepaid label for {order_ref}; drop it at any UPS location.",
       "Sorry about that - a fresh return label for {order_ref} is on its way to your email."]),
    S("return_status",
      ["I sent back the {product} {when}. Has it arrived at your warehouse yet?",
       "My return for order {order} was dropped off {days} days ago but the status hasn't changed.",
       "how do I know if you got my return?"],
      ["Returns take 5-7 business days to be logged; we'll email you when {order_ref} is received.",
       "We'll check the return tracking for {order_ref} and let you know once it's in."]),
    S("exchange_size",
      ["I ordered the {sized} in {size_a} but I need {size_b}. Can I exchange it?",
       "Can I swap my {sized} for the {size_b} size? Still in the packaging.",
       "bought the wrong size {sized} ({size_a}), need {size_b}"],
      ["Yes - start an exchange on your order page and we'll send the {sized} in {size_b}.",
       "Happy to swap it; we'll email a prepaid label and ship the {size_b} size once yours is on its way."]),
    S("return_window",
      ["I bought the {product} {rdays} days ago. Can I still return it?",
       "Is it too late to return something I got {rdays} days ago?",
       "What's your return window? I've had the {product} for about three weeks."],
      ["You have 30 days from delivery, so you're still in time - start it from your order page.",
       "Our return window is 30 days, so you can still send it back."]),
    S("large_item_pickup",
      ["How do I return the {big}? It's way too big to take to a post office.",
       "I need to return my {big}. Do you pick it up?",
       "Can someone collect the {big}? It's still in the box but weighs a ton."],
      ["We collect furniture returns for free - start the return and our delivery partner will call you.",
       "We'll arrange a free pickup for {item} once you start the return from your order page."]),
    S("changed_mind",
      ["I changed my mind about the {product}. It's unopened, can I send it back?",
       "Ordered the {product} on impulse and don't need it anymore. Never opened. Return?",
       "Decided to go with a different style, so I want to return the {product}. Still sealed."],
      ["Unopened items can be returned within 30 days for a full refund.",
       "Sure - return {item} within 30 days and we'll refund you in full."]),
    S("not_as_described",
      ["The {product} looks nothing like the photos. The colour is much darker.",
       "The {product} is a lot smaller than I expected from the website. I'd like to return it.",
       "Quality of the {product} is not what I expected for {price}. Want to return."],
      ["Sorry it wasn't what you expected; you can return {item} free within 30 days.",
       "We're sorry - start a return from your order page and we'll refund you once it's back."]),
    S("gift_return",
      ["I received the {product} as a gift and want to return it. I don't have a receipt.",
       "Can I return a gift without the order number? It was from my sister.",
       "got the {product} as a wedding present, already have one. can I exchange it?"],
      ["Ask the giver for the order number, or send us their email, and we'll issue store credit.",
       "Gifts can be returned for store credit - reply with the giver's name and we'll find the order."]),
    S("drop_off",
      ["Can I drop my return at a UPS store or does it have to be picked up?",
       "Where do I take my return parcel? The label doesn't say.",
       "do you have stores where I can return the {product} in person?"],
      ["The prepaid label works at any UPS store or drop box; we don't have physical stores.",
       "You can drop it at any UPS location with the prepaid label."]),
    S("return_part_of_set",
      ["Can I return just 2 of the 6 plates from the stoneware set?",
       "I only want to keep 2 of the 4 waffle towels. Can I return the other two?",
       "is it possible to return only part of a set"],
      ["Sets can only be returned complete, but the whole set can come back within 30 days.",
       "Sorry, items sold as a set have to be returned as a full set."]),
    S("return_some_items",
      ["I want to keep the {product} but return the other items from order {order}.",
       "Can I return just one thing from my order and keep the rest?",
       "Only want to send back one of the three items I bought. Is that ok?"],
      ["Yes - just select the items you want to send back when you start the return.",
       "Of course; choose only those items from {order_ref} and we'll refund just those."]),
    S("restocking_fee",
      ["Is there a restocking fee if I return the {big}?",
       "Do I have to pay for return shipping? I'm returning the {product}.",
       "how much does it cost to return something"],
      ["Returns within 30 days are free - no restocking fee, and the label is prepaid.",
       "There's no restocking fee or return shipping cost within 30 days, even for {item}."]),
    S("sale_item_return",
      ["Can I return something I bought in the clearance sale?",
       "The {product} was marked final sale but it arrived with a stain. Can I return it?",
       "Bought the {product} on sale for {price}, can I still send it back?"],
      ["Sale items can be returned within 30 days; Final sale items only if damaged or faulty.",
       "Sale items can come back within 30 days, and Final sale items too if they arrived damaged."]),
    S("quality_issue",
      ["The finish on my {big} is peeling after 3 weeks. That's not normal.",
       "The {textile} started fraying after one wash.",
       "My {kitchen} cracked after a month of normal use."],
      ["Sorry to hear that - it's covered by our 1-year warranty, so send a photo and we'll replace {item}.",
       "That shouldn't happen; reply with a photo and we'll arrange a warranty replacement."]),
    S("smell",
      ["The {textile} has a strong chemical smell that won't go away even after airing it out for a week.",
       "The rug smells awful. Can I return it?",
       "Strong odour from the {textile}, it gives me a headache"],
      ["Sorry about that - you can return {item} within 30 days for a refund or exchange.",
       "We're sorry about the smell; start a return and we'll refund or replace it."]),
    S("label_expired",
      ["My return label expired before I could use it. Can I get a new one?",
       "The return label for order {order} was rejected as expired at the UPS store.",
       "was travelling and missed the return label deadline. still ok to return?"],
      ["No problem - we'll email a new prepaid label for {order_ref}, valid for 14 days.",
       "We'll send you a fresh label today, and the return will still be accepted."]),
    S("exchange_out_of_stock",
      ["I want to exchange my {product} for a different colour but it says out of stock.",
       "Can I exchange the {product} for the {color} one? It's sold out online.",
       "exchange item is out of stock, what are my options"],
      ["We can't reserve out-of-stock items, so we'd suggest a refund and reordering later.",
       "We can refund {item} now or hold the exchange until the {color} is restocked."]),
    S("opened_wrong_size",
      ["I opened the {sized} and realised it's the wrong size. Can I still return it if it's been opened?",
       "Took the {sized} out of the packaging, wrong size. Still returnable?",
       "opened my {sized} but it doesn't fit"],
      ["Opened but unused items can be returned within 30 days, or exchanged for another size.",
       "That's fine - start a return or exchange for the {sized} from your order page."]),
    S("washed_return",
      ["Can I return towels I've already washed once? They shed everywhere.",
       "I used the {textile} once and I don't like how it feels. Can I return it?",
       "is it ok to return the {textile} if I washed it"],
      ["Bedding and towels are covered by our 30-day comfort guarantee, even after washing.",
       "Yes, you can return {item} under our 30-day comfort guarantee even if it's been washed."]),
    S("missing_parts",
      ["The {big} is missing the screws for the back panel.",
       "Box for the {big} didn't include part F (two of the brackets). Can't finish assembling it.",
       "missing hardware bag in my {big} box, order {order}"],
      ["Sorry about that - we'll post the missing hardware for {item} today, free of charge.",
       "We'll send the missing parts for {order_ref}; reply with the part letters if you have them."],
      hard=True),
    S("duplicate_item",
      ["I received two of the {product} but only ordered one. How do I send the extra back?",
       "Got the same item twice in order {order}. Only paid for one.",
       "there's an extra {product} in my delivery, want me to return it?"],
      ["Thanks for your honesty - we'll email a prepaid label for the extra {product}.",
       "Thanks for letting us know; a prepaid label for the extra item on {order_ref} is on its way."],
      hard=True),
    S("defective_device",
      ["My {device} stopped working after two weeks. I've already reset it twice, I just want a replacement.",
       "The {device} is dead, won't power on at all. I want to return it for a new one.",
       "Your help article didn't help, the {device} still won't turn on. please send a replacement"],
      ["Sorry it failed so soon - we'll send a replacement {device} and a label for the faulty one.",
       "We'll replace the {device} under warranty and email you a prepaid return label."],
      hard=True),
    S("return_pickup_missed",
      ["The courier never showed up to collect my return on {weekday}. I waited all day.",
       "Return pickup for the {big} was booked for today but no one came.",
       "The driver came to pick up my return but said he couldn't take the {big}. Now what?"],
      ["Sorry about the missed pickup; our delivery partner will call to rebook the collection.",
       "Apologies - we'll arrange a new pickup for {item} and note that it's a large item."],
      hard=True),
    S("damaged_by_courier",
      ["The box was crushed by the delivery guy and the {decor} inside is broken.",
       "Delivery arrived today, the packaging was soaked and the {textile} is ruined.",
       "The {carrier} driver clearly dropped my package. The {kitchen} is in pieces."],
      ["Sorry it arrived broken - send a photo and we'll ship a replacement for {item} right away.",
       "We're sorry; reply with a photo and we'll send a replacement or refund - no need to contact the carrier."],
      hard=True),
    S("where_is_refund",
      ["I returned the {product} {days} days ago and still haven't got my refund.",
       "Where is my refund for order {order}? UPS shows you received the return on {date}.",
       "My money hasn't come back for the return. How long does it take??"],
      ["Refunds go out within 5 business days of the return arriving; we'll check {order_ref} for you.",
       "Sorry for the wait - we'll confirm the refund for {order_ref} and email you today."],
      hard=True),
]

ACCOUNT = [
    S("reset_email_missing",
      ["I asked for a password reset three times and no email arrived.",
       "Forgot my password and the reset email never comes. Checked spam.",
       "password reset email not arriving, my address is {email}"],
      ["Reset emails can take 10 minutes and may land in spam; if not, we'll reset it for you.",
       "We've re-sent the reset link to {email}; it expires in 1 hour."]),
    S("locked_out",
      ["My account is locked after too many login attempts. How long until I can try again?",
       "It says my account is temporarily locked. I need to place an order today.",
       "locked out of my account!! help"],
      ["The lock lifts after 30 minutes; then use Forgot password to set a new one.",
       "For your security the lock lasts 30 minutes, or we can lift it sooner after verifying you."]),
    S("login_code_sms",
      ["I'm not getting the text message with the login code.",
       "The verification code never arrives on my phone, so I can't sign in.",
       "2FA code not coming through. tried like 5 times"],
      ["Please wait 2 minutes between requests, or choose Email me a code instead.",
       "Texts can be delayed by your carrier - try Email me a code on the sign-in screen."]),
    S("lost_authenticator",
      ["I lost my phone and my authenticator app was on it. Now I can't log in.",
       "Got a new phone and didn't move the authenticator app over. How do I get into my account?",
       "my phone was stolen and it had my 2 factor codes"],
      ["Please use a backup code to sign in, or we'll verify you by email and reset two-step verification.",
       "Sorry to hear that - we'll verify your identity by email and reset your two-step verification."]),
    S("suspicious_login",
      ["Got an email about a new sign-in from {city}. That wasn't me.",
       "There was a login to my account from a device I don't recognise {when}.",
       "Security alert said someone logged in from {city}??? I've never been there"],
      ["Please reset your password and turn on two-step verification; we've signed out all other sessions.",
       "We've logged out all devices - please set a new password and tell us about any unfamiliar orders."]),
    S("change_email",
      ["How do I change the email address on my account? I no longer use my old one.",
       "I want to update my login email to {email}.",
       "can't find where to change my email in my account"],
      ["You can change it under Account > Login & security; we'll confirm the new address first.",
       "Please update it under Account > Login & security - a confirmation link will go to {email}."]),
    S("password_changed_not_me",
      ["I got an email saying my password was changed but I didn't do it.",
       "Someone changed my password and the email on my account. I can't get in anymore.",
       "My password was changed this morning and it wasn't me. Please lock the account."],
      ["We've locked your account and will email you a secure link to regain access.",
       "We've secured your account and signed out every session; we'll help you reset the password."]),
    S("phishing",
      ["Got an email saying my Northwind account is suspended and asking for my card details. Is this real?",
       "I received a text from 'Northwind Home' with a link to verify my account. Looks dodgy.",
       "Is this email legit? It says I won a Northwind gift card and need to log in through their link."],
      ["That isn't from us - we never ask for card details or passwords by email or text.",
       "That's a phishing attempt, so please delete it, and change your password if you clicked it."]),
    S("delete_account",
      ["Please delete my account and all my personal data.",
       "I'd like to close my Northwind account. How do I do that?",
       "remove my account please, I don't shop with you anymore"],
      ["Please reply from your account email and we'll delete your account and data within 30 days.",
       "You can request deletion under Account > Privacy; it's completed within 30 days."]),
    S("reset_link_expired",
      ["The password reset link says it's expired but I clicked it right away.",
       "Every reset link I get says 'invalid or expired token'.",
       "reset link doesnt work"],
      ["Only the newest reset link works, so please use the latest email or a private window.",
       "Please request one more link and open it in a private browser window."]),
    S("enable_2fa",
      ["How do I turn on two-factor authentication for my account?",
       "Does Northwind support an authenticator app for login? I'd like extra security.",
       "want to set up 2 step verification"],
      ["Go to Account > Login & security and turn on Two-step verification.",
       "You can enable it under Account > Login & security - remember to save your backup codes."]),
    S("remove_access",
      ["My ex still knows my account password. Can you log out all devices?",
       "I shared my login with a former roommate and want to make sure they can't use it anymore.",
       "sign me out everywhere please, I think I stayed logged in on a library computer"],
      ["Use Account > Login & security > Active sessions to sign out everywhere, then change your password.",
       "We've signed out all sessions on your account; please set a new password now."]),
    S("update_phone",
      ["I changed my phone number and now I can't receive login codes.",
       "My old number is still on my account for verification. How do I update it?",
       "new phone number, how do i change it for the security codes"],
      ["We'll verify your identity by email and then update the phone number for your codes.",
       "If you can sign in, update it under Account > Login & security; if not, we'll do it after verifying you."]),
    S("address_added_unknown",
      ["My saved address was changed to somewhere in {city}. I didn't do that.",
       "There's a new shipping address on my account that I don't recognise.",
       "someone added a card and an address to my account?"],
      ["Please reset your password now; we've flagged your account and will check any open orders.",
       "We've removed the unfamiliar address - please change your password and turn on two-step verification."]),
    S("unrequested_reset",
      ["I received a password reset email I didn't ask for. Should I be worried?",
       "Why am I getting reset codes for my account? I didn't request them.",
       "Got three 'reset your password' emails overnight"],
      ["You can ignore it - your password won't change unless the link is used.",
       "Nothing changes unless the link is used, but turning on two-step verification adds protection."]),
    S("merge_accounts",
      ["I have two accounts with different emails. Can you merge them?",
       "Accidentally created a second account. Can I combine my order history?",
       "how do I move my orders from my old account to my new one"],
      ["Please reply from both email addresses and we'll merge the accounts.",
       "Once you confirm both emails are yours, we'll move your order history into one account."]),
    S("data_request",
      ["Please send me a copy of all the personal data you hold about me.",
       "What personal information do you store on me? I want a copy.",
       "Under privacy law I'd like to know what data Northwind has on my account."],
      ["We'll send a copy of your data to your account email within 30 days after verifying you.",
       "You can download it under Account > Privacy, or we'll email it within 30 days."]),
    S("account_disabled",
      ["My account says it's been disabled. Why?",
       "Tried to log in and got 'this account has been suspended'. I've done nothing wrong.",
       "account deactivated??? I have an order in progress"],
      ["Accounts are sometimes paused after unusual sign-ins; we'll verify you by email and restore access.",
       "Sorry for the worry - we'll email you the steps to verify your identity and reactivate it."]),
    S("password_rules",
      ["It keeps saying my new password isn't strong enough even though it has symbols and numbers.",
       "What are the password requirements? Nothing I enter is accepted.",
       "password reset page won't accept my new password"],
      ["Passwords need at least 12 characters and can't match a recent one.",
       "Try a longer passphrase - we need 12+ characters, different from your last 5 passwords."]),
    S("wrong_info_visible",
      ["When I log in I see someone else's name and orders. That's not my account!",
       "My account page shows an address and orders that aren't mine.",
       "I'm seeing another customer's details in my order history"],
      ["Thank you for telling us - we've ended the session and our security team is investigating.",
       "We're treating this as a privacy incident; our security team will email you within 24 hours."]),
    S("typo_email",
      ["I made a typo in my email when I signed up so I can't log in or reset my password.",
       "Signed up with the wrong email address, can't verify my account.",
       "my account email has a typo (gmial instead of gmail)"],
      ["Please reply with your full name and a recent order number so we can verify you and fix it.",
       "We'll correct the email once we've verified your identity by phone or order details."]),
    S("orders_not_placed",
      ["There are orders in my account I didn't place, and my card was charged {amount} for them.",
       "I see an order for a {product} in my account that I never made. Was my account hacked?",
       "Someone used my Northwind account to buy stuff and ship it to {city}. I didn't place these orders."],
      ["We've locked your account and cancelled open orders you didn't place; please reset your password.",
       "Sorry this happened - our fraud team has the orders and will email you within 24 hours."],
      hard=True),
    S("app_login_after_reset",
      ["I reset my password and now the Northwind Home app won't let me log in to control my {switchable}.",
       "The app keeps saying 'incorrect password' even though I just reset it. I can't turn off my {switchable}.",
       "since the password reset I'm locked out of the app, so I can't change my thermostat schedule"],
      ["Please sign out of the app fully and sign in with the new password.",
       "Log out of the app and back in with your new password; your schedules keep running meanwhile."],
      hard=True),
    S("social_login",
      ["Sign in with Apple just spins and never logs me in.",
       "I always log in with Google and now it says 'no account found'.",
       "the Continue with Google button in your app doesn't work for me anymore"],
      ["Please try your email and Forgot password, or we'll reconnect your Apple or Google sign-in after verifying you.",
       "We'll verify you by email and reconnect your account to your Apple or Google sign-in."],
      hard=True),
    S("gift_card_drained",
      ["My gift card balance went to zero and I never used it.",
       "The {gc} gift card my mum gave me shows $0. Did someone use it?",
       "gift card already redeemed?? I haven't even used it yet"],
      ["We'll trace where the card was used and restore the balance if it wasn't you.",
       "Our security team will check the redemption and reissue the {gc} if it was used without permission."],
      hard=True),
    S("charge_plus_alert",
      ["There's a {amount} charge I don't recognise and I also got an email saying my password was changed.",
       "Unknown order on my card, and a login alert from {city} the same day. I think my account was hacked.",
       "got charged for something I didn't buy right after someone logged into my account"],
      ["It looks like someone accessed your account, so we've locked it and cancelled any open orders.",
       "We've secured your account; our fraud team will review the charge and refund anything unauthorised."],
      hard=True),
]

SALES = [
    S("back_in_stock",
      ["When will the {product} be back in stock?",
       "The {big} is sold out in {color}. Any idea when it'll be available again?",
       "Is the {product} coming back? I've been waiting for weeks."],
      ["We don't have a restock date yet, but Notify me on the product page will email you.",
       "Click Notify me on the page for {item} and we'll email you when it's back."]),
    S("dimensions",
      ["What are the exact dimensions of the {big}? I need to know if it fits in my {room}.",
       "How tall is the {big}? The listing only shows the width.",
       "will the {big} fit through a 30 inch door?"],
      ["All dimensions for the {big} are under Specifications on the product page.",
       "The {big} ships flat-packed or in sections; full measurements are on the product page."]),
    S("bulk_order",
      ["We're furnishing {qty} holiday rental units. Do you offer bulk pricing on the {big}?",
       "Looking to order {qty} of the {big} for our office. Any discount for volume?",
       "Do you do business pricing? We need around {qty} units."],
      ["Orders of 10+ units get business pricing - send us your list and we'll quote within 2 days.",
       "We offer volume discounts; reply with quantities and delivery location for a quote."]),
    S("material",
      ["Is the {textile} machine washable?",
       "What is the {product} actually made of? The description is vague.",
       "Is the Jute area rug OK for a home with a dog?",
       "Is the {big} solid wood or veneer?"],
      ["Materials and care instructions are under Details on the product page.",
       "The full material breakdown for {item} is on its product page under Details."]),
    S("colors",
      ["Does the {product} come in any other colours?",
       "Is the {big} available in {color}?",
       "any plans to do the {product} in {color}"],
      ["All current colours are on the product page, and we'll pass your {color} request on.",
       "The product page lists every colour we offer for {item}."]),
    S("price_match",
      ["Do you price match? I saw the {product} cheaper on another site.",
       "Another store has a similar {big} for less. Can you match it?",
       "will you beat a competitor's price"],
      ["We don't price match, but our newsletter gives 10% off your first order.",
       "Sorry, we can't match other stores' prices, but new customers get 10% off with our newsletter."]),
    S("gift_cards",
      ["Do you sell gift cards? I'd like to send one to my sister for her birthday.",
       "Can I buy an e-gift card and schedule it to be emailed on {date}?",
       "what amounts do your gift cards come in"],
      ["Yes - e-gift cards come in $25 to $500 and can be scheduled for any date.",
       "You'll find e-gift cards from $25 to $500 on our Gift cards page."]),
    S("upcoming_sale",
      ["Are you having a sale anytime soon? I want the {big} but it's a bit pricey.",
       "Any discount codes available right now?",
       "does northwind do black friday deals"],
      ["We can't share upcoming sales, but newsletter subscribers hear about promotions first.",
       "No public code right now, but our newsletter gives 10% off your first order."]),
    S("matching_items",
      ["Does the {big} come in a darker finish? I want it to match my other furniture.",
       "I have the Alder oak side table. Is there a matching bookshelf?",
       "what goes well with the {big}? looking for a matching set"],
      ["The Shop by collection page groups our pieces by finish so you can match them.",
       "The product page for {item} has a Complete the look section with matching pieces."]),
    S("showroom",
      ["Do you have a showroom where I can see the {big} in person?",
       "Can I see your furniture anywhere before buying? Is there a store in {city}?",
       "any physical stores?"],
      ["We're online only, but swatches are free and returns are free for 30 days.",
       "We don't have showrooms, but you can return anything within 30 days."]),
    S("assembly_service",
      ["Do you offer assembly for the {big}? I'm not great with tools.",
       "If I buy the {big}, can someone put it together for me?",
       "is assembly included with furniture?"],
      ["Yes, you can add assembly at checkout and the team will build it on delivery.",
       "Assembly isn't included, but you can add it for {item} at checkout."]),
    S("weight_capacity",
      ["How much weight can each shelf of the Birch bookshelf hold?",
       "Is the {big} sturdy enough for a heavy TV?",
       "what's the max weight for the Cedar bench? we're a big family"],
      ["Weight limits are listed under Specifications on each product page.",
       "Load ratings are on the product page, and we're happy to check your use case."]),
    S("swatches",
      ["Can I get fabric swatches for the Fjord sofa before ordering?",
       "Do you send samples of the {textile} colours?",
       "I'd like to see the {color} fabric in person before buying the sofa"],
      ["Yes - order up to 5 free swatches on the product page; they arrive in about a week.",
       "Free swatches are available, so you can see the {color} in your own light."]),
    S("registry",
      ["Do you have a wedding registry?",
       "Can I set up a baby registry with Northwind Home?",
       "my friend said you have a gift registry, how does it work"],
      ["Yes - create a registry on our Registry page and share the link with guests.",
       "Our registry is free, and you get 10% off anything left on it after the event."]),
    S("recommendation",
      ["Looking for a rug for a 12x14 living room. We have a dog, what would you suggest?",
       "I need blackout curtains for a nursery, which ones would you recommend?",
       "what's the best bedding for someone who runs hot at night?",
       "Setting up a home office, any desk recommendations under $400?"],
      ["Happy to help - we'll email you a few picks that fit your space and budget.",
       "Great question; we'll send you a short list of suggestions with links."]),
    S("trade_program",
      ["I'm an interior designer. Do you have a trade program?",
       "Do you offer designer discounts? I source furniture for clients.",
       "Is there a professional account for stylists or designers?"],
      ["Yes, our trade program gives designers 15% off - apply on the Trade page.",
       "We do; apply on our Trade page for 15% off and priority support."]),
    S("group_discount",
      ["Do you offer a student discount?",
       "Is there a military or first responder discount?",
       "any discount for teachers?"],
      ["We don't offer group discounts right now, but newsletter sign-ups get 10% off.",
       "No dedicated discount at the moment, but our newsletter gives 10% off your first order."]),
    S("sold_individually",
      ["Are the Harbor dining chairs sold individually or only in pairs?",
       "Can I buy just one of the waffle towels instead of the set of 4?",
       "do the dining chairs come as a set of 4"],
      ["The Harbor dining chairs come in pairs, and you can add as many pairs as you need.",
       "Each listing shows what's included; we'll check if single pieces are available."]),
    S("warranty_prebuy",
      ["What warranty comes with the {big}?",
       "How long is the warranty on your furniture?",
       "If I buy the {device}, how long is it covered for?"],
      ["Furniture has a 1-year warranty and smart devices 2 years.",
       "Our furniture is covered for 1 year and Northwind devices for 2, extendable with Care+."]),
    S("custom_size",
      ["Can you make the {big} in a custom size?",
       "Do you do custom lengths for the Blackout curtains? My windows are really tall.",
       "is it possible to order the Jute area rug in 6x9"],
      ["We don't offer custom sizes, but all available sizes are on the product page.",
       "Sorry, no custom sizes, but we'll pass your request to our product team."]),
    S("whats_included",
      ["Does the Linen duvet cover come with pillowcases?",
       "Is the bulb included with the Brass floor lamp?",
       "Does the {device} come with everything I need or do I need a hub?"],
      ["The What's in the box section on the product page lists everything included.",
       "Everything included is listed under What's in the box; our devices don't need a hub."]),
    S("starter_kit",
      ["Is there a bundle with the SmartBulbs and a SmartPlug? I'm new to smart home stuff.",
       "Do you sell a starter kit for the Northwind smart devices?",
       "Thinking of getting the Motion Sensor and a few bulbs, any bundle deals?"],
      ["Yes - our Smart Home Starter Kit has 4 SmartBulbs and 2 SmartPlugs at a bundle price.",
       "Our Starter Kit bundles SmartBulbs and SmartPlugs at a discount."]),
    S("thermostat_compat",
      ["Before I buy the Thermostat, will it work with my heat pump?",
       "Thinking of ordering the Northwind Thermostat. Is it compatible with a two-stage furnace?",
       "does your smart thermostat work with old wiring without a c wire? haven't bought it yet"],
      ["It works with most heat pumps and two-stage systems; the checker on the product page confirms yours.",
       "Most systems are supported, even without a C-wire - use the compatibility checker before you buy."],
      hard=True),
    S("financing",
      ["Can I pay for the {big} in installments?",
       "Do you offer financing? The {big} is a bit much to pay all at once.",
       "Is Klarna or Affirm available at checkout?"],
      ["Yes - orders over $150 can be split into 4 interest-free payments at checkout.",
       "You can choose pay-later at checkout on orders over $150."],
      hard=True),
    S("delivery_time_prebuy",
      ["If I order the {big} today, will it arrive before {date}?",
       "How long does delivery usually take for furniture? Trying to decide before I order.",
       "thinking of ordering the {product}, how fast is shipping to {city}"],
      ["Enter your ZIP code on the product page to see the delivery estimate before you order.",
       "Furniture usually takes 1-2 weeks and small items 3-5 business days."],
      hard=True),
    S("international",
      ["Do you ship to Canada?",
       "I live in the UK. Can I order from you and have it shipped here?",
       "planning to order a few things, do you deliver to Puerto Rico?"],
      ["Sorry, we only deliver within the contiguous United States for now.",
       "We currently ship to the 48 contiguous US states only."],
      hard=True),
    S("subscription_prebuy",
      ["Does the Video Doorbell need a subscription? Want to know before I buy.",
       "Is there a monthly fee to use the {device} with the app?",
       "Do I need to pay for cloud storage with the doorbell or is it free?"],
      ["No subscription needed - the app is free, and extended video history is optional.",
       "All core features are free; only the optional cloud video plan has a fee."],
      hard=True),
]

SITUATIONS = {
    "Billing": BILLING,
    "Technical Support": TECH,
    "Shipping": SHIPPING,
    "Returns": RETURNS,
    "Account Security": ACCOUNT,
    "Sales": SALES,
}

# --------------------------------------------------------------------------- ticket framing

OPENERS = ["Hi,", "Hello,", "Hi there,", "Hello team,", "Hey,", "Good morning,", "Good afternoon,",
           "Dear Northwind Home,", "Hi Northwind,", "hi", "Hello Northwind team,",
           "To whom it may concern,", "Hi support,", "Hey there"]
CLOSERS = ["Thanks, {first}", "Thank you, {first}", "Thanks!", "Thanks in advance.", "Regards, {first} {last}",
           "Best, {first}", "- {first}", "Cheers, {first}", "thx", "Kind regards,\n{first} {last}",
           "Many thanks, {first}", "Please advise.", "Thank you", "{first}"]
TONE_ADDONS = {
    "polite": ["Thanks so much for your help.", "Appreciate it!", "Any help would be great.",
               "Sorry if this is the wrong place to ask.", "Thank you for your time."],
    "angry": ["This is really frustrating.", "Honestly not impressed.", "Please sort this out asap.",
              "Second time I'm writing about this.", "Very disappointed.",
              "I've been a customer for years and never had this before."],
    "ramble": ["We just moved into a new place so everything is a bit chaotic.",
               "My partner says I should just call but I'd rather write.",
               "Sorry if this is a silly question, I'm not great with this stuff.",
               "I tried to find the answer in your FAQ but couldn't.",
               "Writing this from my phone on the train, sorry for any typos.",
               "I've got family coming to stay next weekend, so the timing isn't great."],
    "urgent": ["I need this sorted today if possible.", "Please reply quickly.", "Urgent please."],
}
DETAILS = {
    "Billing": ["I've shopped with you before and never had an issue.", "I can send a screenshot if that helps.",
                "We're on a tight budget this month so I'd like to get this sorted.",
                "My husband usually deals with this but he's away this week.",
                "I'd rather sort it out by email than wait on the phone."],
    "Technical Support": ["I'm not very techy so simple steps would help.", "I'm on the latest version of the app.",
                          "I've had Northwind devices for a couple of years now.",
                          "I already tried turning it off and on again.",
                          "I'm on an Android phone, if that matters."],
    "Shipping": ["It's a gift so the timing really matters.", "I've ordered from you before and never had an issue.",
                 "I'm home most days this week.", "Sorry to bother you with this.",
                 "I live in an apartment building if that matters."],
    "Returns": ["I still have all the original packaging.", "I can send photos if needed.",
                "Other than this I love your stuff.", "First time I've had to return anything with you.",
                "I'd like to sort this out before the weekend."],
    "Account Security": ["I've had my account for years.", "I mostly shop on the app.",
                         "I'd rather sort this out by email than on the phone.",
                         "I have an order coming so I want to keep an eye on it.", "Not sure if I am doing something wrong."],
    "Sales": ["We're redoing our living room this spring.", "I've had my eye on it for a while.",
              "We just bought our first house.", "I'm trying to decide before the weekend.",
              "A friend recommended you."],
}
ORDER_LINES = [" Order {order}.", " (order {order})", "\nOrder number: {order}", " Order no. {order}",
               " My order number is {order}."]
ORDER_DEPTS = {"Billing", "Shipping", "Returns"}

MISSPELL = {
    "received": "recieved", "definitely": "definately", "address": "adress", "separate": "seperate",
    "tomorrow": "tommorow", "until": "untill", "because": "becuase", "please": "pls",
    "really": "realy", "weird": "wierd", "believe": "beleive", "there": "their",
    "you": "u", "thanks": "thx", "already": "allready", "cancelled": "canceled",
}

# --------------------------------------------------------------------------- generation

FORMATTER = string.Formatter()
HELPER_FIELDS = {"order_ref"}


def fields_of(template: str) -> list[str]:
    out = []
    for _, name, _, _ in FORMATTER.parse(template):
        if name is not None and name not in out:
            out.append(name)
    return out


def money(x: float) -> str:
    return f"${x:,.2f}"


def ticket_money(rng: Random, x: float) -> str:
    if float(x).is_integer() and rng.random() < 0.6:
        return f"${int(x):,}"
    return money(x)


def make_context(rng: Random) -> tuple[dict, dict, dict]:
    """Return (ticket_values, reply_values, meta) for every slot."""
    tv, rv, meta = {}, {}, {}
    for slot, pool in PRODUCT_SLOTS.items():
        name, price, aliases = rng.choice(pool)
        tv[slot] = rng.choice(aliases)
        rv[slot] = name
        meta[slot] = (name, price)
    sized_name, sizes = rng.choice(SIZED)
    a, b = rng.sample(sizes, 2)
    tv["sized"] = rv["sized"] = sized_name
    meta["sized"] = (sized_name, None)
    tv["size_a"] = rv["size_a"] = a
    tv["size_b"] = rv["size_b"] = b

    digits = f"{rng.randint(10000, 99999)}"
    rv["order"] = f"NW-{digits}"
    tv["order"] = rng.choices(
        [f"NW-{digits}", f"#NW-{digits}", f"nw-{digits}", f"NW{digits}", f"NW {digits}"],
        weights=[70, 10, 8, 7, 5])[0]
    code, pct = rng.choice(CODES)
    simple = {
        "code": code, "pct": str(pct),
        "when": rng.choice(WHEN),
        "date": f"{rng.choice(MONTHS)} {rng.randint(1, 28)}",
        "weekday": rng.choice(WEEKDAYS),
        "days": str(rng.randint(4, 15)),
        "rdays": str(rng.randint(6, 27)),
        "carrier": rng.choice(CARRIERS),
        "city": rng.choice(CITIES),
        "last4": f"{rng.randint(0, 9999):04d}",
        "inv": f"INV-{rng.randint(100000, 999999)}",
        "phone": rng.choice(PHONES),
        "qty": str(rng.randint(10, 60)),
        "room": rng.choice(ROOMS),
        "gate": f"{rng.randint(1000, 9999)}",
    }
    c1, c2 = rng.sample(COLORS, 2)
    simple["color"], simple["color2"] = c1, c2
    first, last = rng.choice(FIRST), rng.choice(LAST)
    simple["first"], simple["last"] = first, last
    simple["email"] = f"{first.lower()}.{last.lower().replace(chr(39), '')}@{rng.choice(EMAIL_DOMAINS)}"
    for k, v in simple.items():
        tv[k] = rv[k] = v
    amounts = {
        "amount": rng.randint(15, 300) + rng.choice([0, 0.99, 0.5, 0.95, 0.49]),
        "ship_fee": rng.choice([5.95, 9.95, 12.95, 14.95, 19.95, 24.95]),
        "asm_fee": rng.choice([39, 49, 59, 79, 99]),
        "monthly": rng.choice([3.99, 4.99, 6.99, 9.99, 12.99]),
        "bank_fee": rng.choice([0.87, 1.47, 2.35, 3.12, 4.5, 5.97]),
        "gc": rng.choice([25, 50, 75, 100, 150, 200]),
        "short": rng.choice([5, 12.5, 18, 24, 30.5, 45]),
    }
    for k, v in amounts.items():
        tv[k] = ticket_money(rng, v)
        rv[k] = money(v)
    meta["higher_factor"] = rng.uniform(1.08, 1.4)
    return tv, rv, meta


def add_typos(rng: Random, text: str) -> str:
    words = re.findall(r"\b[a-z]{5,}\b", text)
    if not words:
        return text
    for _ in range(rng.choice([1, 1, 2])):
        w = rng.choice(words)
        i = rng.randint(1, len(w) - 2)
        op = rng.random()
        if op < 0.45:
            new = w[:i] + w[i + 1] + w[i] + w[i + 2:]
        elif op < 0.75:
            new = w[:i] + w[i + 1:]
        else:
            new = w[:i] + w[i] + w[i:]
        text = re.sub(rf"\b{w}\b", new, text, count=1)
    return text


def add_misspelling(rng: Random, text: str) -> str:
    present = [w for w in MISSPELL if re.search(rf"\b{w}\b", text)]
    if not present:
        return text
    w = rng.choice(present)
    return re.sub(rf"\b{w}\b", MISSPELL[w], text, count=1)


def render_example(rng: Random, dept: str, situation: dict, phrasings: list[str]) -> dict:
    tv, rv, meta = make_context(rng)
    core = rng.choice(phrasings)
    used = fields_of(core)

    # Optionally tack on an order number for departments where customers usually have one.
    order_line = ""
    if dept in ORDER_DEPTS and "order" not in used and rng.random() < 0.3:
        order_line = rng.choice(ORDER_LINES)
        used.append("order")

    # Price follows the product the ticket actually talks about.
    item_slot = next((s for s in ITEM_SLOT_ORDER if s in used), None)
    price = meta[item_slot][1] if item_slot and meta[item_slot][1] is not None else meta["product"][1]
    higher = round(price * meta["higher_factor"], 2)
    tv["price"], rv["price"] = ticket_money(rng, price), money(price)
    tv["higher"], rv["higher"] = ticket_money(rng, higher), money(higher)

    text = core.format(**tv) + order_line.format(**tv)

    # Framing: extra detail (longer, rambling tickets), tone add-on, opener, closer.
    def append(text: str, sentence: str) -> str:
        if text[-1] not in ".!?)" and rng.random() < 0.5:
            text += "."
        return text + " " + sentence

    if rng.random() < 0.17:
        text = append(text, " ".join(rng.sample(DETAILS[dept], rng.choice([1, 1, 2]))))
    # Complaining tones only on tickets that report a problem, not on plain questions.
    complaint = dept != "Sales" and not core.rstrip().endswith("?")
    tones = ["polite", "angry", "ramble", "urgent"] if complaint else ["polite", "ramble"]
    tone = None
    if rng.random() < 0.22:
        tone = rng.choice(tones)
        text = append(text, rng.choice(TONE_ADDONS[tone]))
    if rng.random() < 0.4:
        sep = rng.choices([" ", "\n", "\n\n"], weights=[6, 3, 1])[0]
        text = rng.choice(OPENERS) + sep + text
    if rng.random() < 0.36:
        sep = rng.choices([" ", "\n", "\n\n"], weights=[5, 4, 1])[0]
        closers = [c for c in CLOSERS if tone != "polite" or "Thank" not in c]
        text = text + sep + rng.choice(closers).format(**tv)

    # Noise.
    if rng.random() < 0.15:
        text = add_misspelling(rng, text)
    if rng.random() < 0.15:
        text = add_typos(rng, text)
    if rng.random() < 0.10:
        text = text.lower()
    if rng.random() < 0.12 and text[-1] in ".!":
        text = text[:-1]

    # Reply: only templates whose slots the ticket actually mentioned.
    used_set = set(used)
    has_item = item_slot is not None
    candidates = []
    for tpl in situation["r"]:
        need = [f for f in fields_of(tpl) if f not in HELPER_FIELDS]
        ok = all((f in used_set) or (f == "item" and has_item) for f in need)
        if ok:
            candidates.append(tpl)
    if not candidates:
        raise AssertionError(f"no reply fits {dept}/{situation['key']}: {core!r}")
    reply_tpl = rng.choice(candidates)
    rv["order_ref"] = f"order {rv['order']}" if "order" in used_set else "your order"
    if has_item:
        rv["item"] = "the " + meta[item_slot][0]
    reply = reply_tpl.format(**rv)
    reply = reply[0].upper() + reply[1:]

    return {
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": text},
            {"role": "assistant", "content": f"Department: {dept}\nReply: {reply}"},
        ]
    }


def validate_templates() -> None:
    """Static checks: enough situations, known slots, and a usable reply for every phrasing."""
    tv, rv, _ = make_context(Random(0))
    known = set(tv) | {"price", "higher"}
    for dept, pool in SITUATIONS.items():
        assert len(pool) >= 25, f"{dept} has only {len(pool)} situations"
        assert len({s["key"] for s in pool}) == len(pool), f"duplicate situation key in {dept}"
        for sit in pool:
            for tpl in sit["t"] + sit["r"]:
                unknown = set(fields_of(tpl)) - known - HELPER_FIELDS - {"item"}
                assert not unknown, f"{dept}/{sit['key']}: unknown slots {unknown}"
            for tpl in sit["t"]:
                for extra in ([], ["order"]):
                    used = set(fields_of(tpl)) | set(extra)
                    has_item = any(s in used for s in ITEM_SLOT_ORDER)
                    fits = [r for r in sit["r"]
                            if all(f in used or (f == "item" and has_item)
                                   for f in fields_of(r) if f not in HELPER_FIELDS)]
                    assert fits, f"{dept}/{sit['key']}: no reply fits {tpl!r}"


def normalise(text: str) -> str:
    text = text.lower()
    text = re.sub(r"[^\w\s]", "", text)
    return re.sub(r"\s+", " ", text).strip()


def dept_counts(n: int) -> list[int]:
    base, extra = divmod(n, len(DEPARTMENTS))
    return [base + (1 if i < extra else 0) for i in range(len(DEPARTMENTS))]


def generate(seed: int, sizes: dict[str, int]) -> dict[str, list[dict]]:
    rng = Random(seed)
    seen: set[str] = set()
    train_tokens: list[frozenset[str]] = []
    # One phrasing of every situation is held out for validation/test, so evaluation tickets
    # are new wordings of known situations rather than train tickets with different slot fills.
    held_out = {s["key"]: rng.randrange(len(s["t"])) for pool in SITUATIONS.values() for s in pool}
    # Situations are drawn least-used first (train, and validation+test jointly), so every
    # situation is covered and validation and test mostly use different situations.
    usage = {"train": {}, "eval": {}}
    out: dict[str, list[dict]] = {}
    for split, n in sizes.items():
        counter = usage["train" if split == "train" else "eval"]
        # Exactly round(15%) hard cases per split, spread as evenly as possible over departments.
        n_hard = round(HARD_CASE_RATE * n)
        base, extra = divmod(n_hard, len(DEPARTMENTS))
        lucky = rng.sample(DEPARTMENTS, extra)
        plan = []
        for dept, k in zip(DEPARTMENTS, dept_counts(n)):
            h = min(k, base + (1 if dept in lucky else 0))
            plan.extend([(dept, True)] * h + [(dept, False)] * (k - h))
        rng.shuffle(plan)
        rows = []
        for dept, want_hard in plan:
            pool = [s for s in SITUATIONS[dept] if s["hard"] == want_hard]
            for attempt in range(500):
                least = min(counter.get(s["key"], 0) for s in pool)
                options = pool if attempt >= 50 else [s for s in pool if counter.get(s["key"], 0) == least]
                situation = rng.choice(options)
                h = held_out[situation["key"]]
                phrasings = ([t for i, t in enumerate(situation["t"]) if i != h] if split == "train"
                             else [situation["t"][h]])
                ex = render_example(rng, dept, situation, phrasings)
                text = ex["messages"][1]["content"]
                key = normalise(text)
                if key in seen:
                    continue
                toks = token_set(text)
                if split != "train" and any(len(toks & t) / len(toks | t) >= NEAR_DUPLICATE for t in train_tokens):
                    continue
                seen.add(key)
                if split == "train":
                    train_tokens.append(toks)
                counter[situation["key"]] = counter.get(situation["key"], 0) + 1
                ex["_hard"] = situation["hard"]
                rows.append(ex)
                break
            else:
                raise RuntimeError(f"could not generate a unique ticket for {dept}")
        out[split] = rows
    return out


def token_set(text: str) -> frozenset[str]:
    return frozenset(re.findall(r"[a-z0-9]+", text.lower()))


def check(data: dict[str, list[dict]]) -> None:
    train_keys = {normalise(ex["messages"][1]["content"]) for ex in data["train"]}
    train_tokens = [token_set(ex["messages"][1]["content"]) for ex in data["train"]]
    all_keys: list[str] = []
    for split, rows in data.items():
        counts = [0] * len(DEPARTMENTS)
        for ex in rows:
            m = ex["messages"]
            assert [x["role"] for x in m] == ["system", "user", "assistant"]
            assert m[0]["content"] == SYSTEM
            match = re.fullmatch(r"Department: (.+)\nReply: (.+)", m[2]["content"], flags=re.S)
            assert match and match.group(1) in DEPARTMENTS, m[2]["content"]
            counts[DEPARTMENTS.index(match.group(1))] += 1
            key = normalise(m[1]["content"])
            all_keys.append(key)
            if split != "train":
                assert key not in train_keys, f"{split} ticket duplicates train: {m[1]['content']!r}"
                toks = token_set(m[1]["content"])
                near = max((len(toks & t) / len(toks | t) for t in train_tokens), default=0.0)
                assert near < NEAR_DUPLICATE, f"{split} ticket is a near-duplicate of train: {m[1]['content']!r}"
        if rows:
            assert max(counts) - min(counts) <= max(1, 0.2 * min(counts)), f"{split} unbalanced: {counts}"
    assert len(all_keys) == len(set(all_keys)), "duplicate tickets across splits"


def text_chars(rows: list[dict]) -> int:
    """Characters of ticket text plus reply text (without the 'Department:/Reply:' scaffolding)."""
    return sum(len(ex["messages"][1]["content"]) + len(ex["messages"][2]["content"].split("\nReply: ", 1)[1])
               for ex in rows)


def readme(data: dict[str, list[dict]], seed: int) -> str:
    sizes = {s: len(r) for s, r in data.items()}
    lines = [
        "# Northwind Home support tickets (demo dataset)",
        "",
        "Synthetic customer-support tickets for **Northwind Home**, a fictional online home-goods",
        "retailer (furniture, bedding, kitchenware, lighting and a few Northwind smart-home devices).",
        "The task: read a ticket, route it to exactly one of six departments, and write a short",
        "reply to the customer. All text is written from templates in `scripts/make_demo_data.py`;",
        "no external data is used.",
        "",
        "## Format",
        "",
        "One JSON object per line (OpenAI chat format). The system prompt is identical on every line:",
        "",
        "```json",
        '{"messages": [{"role": "system", "content": "<SYSTEM>"},',
        '              {"role": "user", "content": "<the ticket, as the customer wrote it>"},',
        '              {"role": "assistant", "content": "Department: <Dept>\\nReply: <1-2 sentences>"}]}',
        "```",
        "",
        f"SYSTEM: {SYSTEM}",
        "",
        "`labels.json` lists the departments in a fixed order: " + ", ".join(DEPARTMENTS) + ".",
        "",
        "## Counts",
        "",
        "| Department | " + " | ".join(sizes) + " |",
        "|---|" + "---:|" * len(sizes),
    ]
    for dept in DEPARTMENTS:
        cells = [str(sum(1 for ex in data[s] if ex["_dept"] == dept)) for s in sizes]
        lines.append(f"| {dept} | " + " | ".join(cells) + " |")
    lines.append("| **Total** | " + " | ".join(str(n) for n in sizes.values()) + " |")
    hard = {s: sum(1 for ex in data[s] if ex["_hard"]) for s in sizes}
    lines += [
        "",
        "About 15% of tickets in each split are deliberate hard cases that use another department's",
        "vocabulary (" + ", ".join(f"{s}: {hard[s]}" for s in sizes) + "); they follow the rules below.",
        "Every situation has one phrasing held out from train and used only for validation/test,",
        "so evaluation tickets are new wordings of known situations. No ticket appears twice, no",
        "validation/test ticket equals a train ticket after normalisation (lowercase, punctuation",
        "stripped, whitespace collapsed), and none shares 80% or more of its words with a train",
        "ticket; the generator asserts all of this. Tickets are mostly 10-50 words; the train split holds about",
        f"{text_chars(data['train']) // 1000}k characters of ticket + reply text.",
        "",
        "## Routing rules for ambiguous tickets",
        "",
    ]
    for i, (title, rule) in enumerate(ROUTING_RULES, 1):
        lines.append(f"{i}. **{title}.** {rule}")
    lines += [
        "",
        "## Regenerate",
        "",
        "```bash",
        "python scripts/make_demo_data.py            # seed 0, 420/60/120, writes this folder",
        "python scripts/make_demo_data.py --seed 1 --n-train 200 --out /tmp/support",
        "```",
        "",
        f"These files were generated with seed {seed}; the same seed and counts give byte-identical files.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    root = Path(__file__).resolve().parent.parent
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-train", type=int, default=420)
    p.add_argument("--n-validation", type=int, default=60)
    p.add_argument("--n-test", type=int, default=120)
    p.add_argument("--out", type=Path, default=root / "examples" / "data" / "support")
    args = p.parse_args(argv)

    validate_templates()
    sizes = {"train": args.n_train, "validation": args.n_validation, "test": args.n_test}
    data = generate(args.seed, sizes)
    for rows in data.values():
        for ex in rows:
            ex["_dept"] = ex["messages"][2]["content"].split("\n", 1)[0][len("Department: "):]
    check(data)

    args.out.mkdir(parents=True, exist_ok=True)
    for split, rows in data.items():
        with open(args.out / f"{split}.jsonl", "w", encoding="utf-8", newline="\n") as f:
            for ex in rows:
                f.write(json.dumps({"messages": ex["messages"]}, ensure_ascii=False) + "\n")
    (args.out / "labels.json").write_text(json.dumps(DEPARTMENTS, indent=2) + "\n", encoding="utf-8")
    (args.out / "README.md").write_text(readme(data, args.seed), encoding="utf-8")

    for split, rows in data.items():
        text = text_chars(rows)
        full = sum(len(ex["messages"][1]["content"]) + len(ex["messages"][2]["content"]) for ex in rows)
        per = {d: sum(1 for ex in rows if ex["_dept"] == d) for d in DEPARTMENTS}
        print(f"{split}: {len(rows)} examples; ticket+reply text {text} chars "
              f"({full} with the 'Department:/Reply:' lines); {per}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
